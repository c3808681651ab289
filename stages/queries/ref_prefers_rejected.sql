-- Pairs where the reference model already scores the rejected response higher (needs --scores),
-- most negative margin first: the pairs DPO has the most to move.
SELECT pair_id, split, ref_margin, ref_chosen_elbo, ref_rejected_elbo,
       prompt_len, chosen_len, rejected_len, truncated
FROM scores
WHERE ref_margin < 0
ORDER BY ref_margin ASC, pair_id
LIMIT 50;
