"""``lldm-dpo query``'s library: DuckDB views over the pipeline's artefacts (``views``), SQL run read-only inside
a sandbox of the views' files (``sql``), and the rows as a table, CSV or JSON (``output``)."""
