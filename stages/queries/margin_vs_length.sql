-- Does the reference margin just track the length difference? (needs --scores)
-- ELBOs are sums over tokens, so longer responses score lower; buckets of chosen_len - rejected_len.
SELECT CASE
         WHEN chosen_len - rejected_len <= -32 THEN 'a: chosen shorter by 32+'
         WHEN chosen_len - rejected_len <= -8 THEN 'b: chosen shorter by 8-31'
         WHEN chosen_len - rejected_len < 8 THEN 'c: within 7 tokens'
         WHEN chosen_len - rejected_len < 32 THEN 'd: chosen longer by 8-31'
         ELSE 'e: chosen longer by 32+'
       END AS length_gap,
       count(*) AS pairs,
       round(avg(ref_margin), 4) AS mean_ref_margin,
       round(avg(CASE WHEN ref_margin > 0 THEN 1.0 ELSE 0.0 END), 4) AS ref_prefers_chosen,
       round(corr(ref_margin, chosen_len - rejected_len), 4) AS corr_margin_len_gap
FROM scores
GROUP BY length_gap
ORDER BY length_gap;
