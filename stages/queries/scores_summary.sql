-- Reference ELBO scores per split (needs --scores): how often the reference already prefers chosen.
SELECT split,
       count(*) AS pairs,
       round(avg(ref_chosen_elbo), 4) AS mean_ref_chosen_elbo,
       round(avg(ref_rejected_elbo), 4) AS mean_ref_rejected_elbo,
       round(avg(ref_margin), 4) AS mean_ref_margin,
       round(median(ref_margin), 4) AS median_ref_margin,
       round(avg(CASE WHEN ref_margin > 0 THEN 1.0 ELSE 0.0 END), 4) AS ref_prefers_chosen,
       round(avg(chosen_len), 1) AS mean_chosen_len,
       round(avg(rejected_len), 1) AS mean_rejected_len,
       sum(CASE WHEN truncated THEN 1 ELSE 0 END) AS truncated
FROM scores
GROUP BY split
ORDER BY split;
