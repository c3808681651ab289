-- Accepted pairs per split and quarantined records per reason (needs --pairs).
SELECT 'accepted' AS kind, split AS key, count(*) AS records,
       round(avg(length(prompt)), 1) AS avg_prompt_chars,
       round(avg(length(chosen)), 1) AS avg_chosen_chars,
       round(avg(length(rejected)), 1) AS avg_rejected_chars
FROM pairs GROUP BY split
UNION ALL
SELECT 'quarantined', reason, count(*), NULL, NULL, NULL
FROM quarantine GROUP BY reason
ORDER BY kind, key;
