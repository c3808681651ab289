-- Self-generated samples per round (needs --samples, e.g. a `run --rounds` folder): questions, the share
-- with at least one correct sample (pass@k), with only correct / only wrong samples, and sample accuracy.
SELECT round,
       count(*) AS questions,
       round(avg(CASE WHEN n_correct > 0 THEN 1.0 ELSE 0.0 END), 4) AS share_with_a_correct_sample,
       sum(CASE WHEN n_correct = n THEN 1 ELSE 0 END) AS only_correct,
       sum(CASE WHEN n_correct = 0 THEN 1 ELSE 0 END) AS only_wrong,
       round(sum(n_correct) / sum(n), 4) AS sample_accuracy,
       max(n) AS samples_per_question
FROM (SELECT round, question_id, count(*) AS n, sum(CASE WHEN correct THEN 1 ELSE 0 END) AS n_correct
      FROM samples GROUP BY round, question_id)
GROUP BY round
ORDER BY round;
