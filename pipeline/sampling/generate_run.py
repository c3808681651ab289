"""generate's run: prompts read from JSONL or a pairs Arrow file, completions sampled for those not already in
the output (resumable: rows streamed to ``OUT.partial``, checked against this run's settings and the content of
the model and the prompts file), the output written sorted by index."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.core.atomic import check_replaceable, check_writable, file_sha256, sweep_stale
from pipeline.core.errors import UserError
from pipeline.core.progress import progress_bar
from pipeline.data.prompts import follow_cache, resolve_chat_template
from pipeline.data.readers import jsonl_objects
from pipeline.refcache.fingerprint import fingerprint_digest
from pipeline.refcache.reader import open_cache
from pipeline.sampling.completion import (
    append_jsonl,
    check_settings,
    complete,
    earlier_rows,
    load_for_sampling,
    sampler_settings,
    write_jsonl,
)


@dataclass
class GenerateResult:
    out: str
    prompts: int
    generated_now: int
    """Prompts sampled by this invocation."""
    resumed: int
    """Prompts already done in the output or partial file."""
    seconds: float
    tokens_per_second: float
    """Generated (sampled) tokens per second of sampling, this invocation."""
    stopped_fraction: float
    """Share of completions that ended with a stop token rather than at gen_length."""
    details: dict[str, Any] = field(default_factory=dict)


# --- reading prompts ----------------------------------------------------------------


@dataclass
class PromptRecord:
    index: int
    where: str  # "file:line" or "file:row" for errors
    fields: dict[str, Any]
    prompt: Any  # what is rendered: text or a list of {role, content} messages
    shown: Any  # the input field's value, written as the output's `prompt`


def read_prompts(path: str | Path, prompt_field: str | None = None) -> list[PromptRecord]:
    """Prompt records of a JSONL file or a pairs Arrow file, in file order."""
    path = Path(path)
    if not str(path) or not path.exists():
        raise UserError(f"{path}: prompts file not found")
    with path.open("rb") as f:
        is_arrow = f.read(6) == b"ARROW1"  # the Arrow IPC file magic, whatever the suffix
    items = ((f"{path}:row {i}", row) for i, row in enumerate(_arrow_rows(path))) if is_arrow else jsonl_objects(path)
    records: list[PromptRecord] = []
    for where, row in items:
        name = prompt_field or ("prompt" if "prompt" in row else "question")
        if name not in row or row[name] is None:
            raise UserError(f"{where}: no {prompt_field!r} field" if prompt_field else f"{where}: no 'prompt' or 'question' field")
        value = shown = row[name]
        # A pairs file keeps the structured conversation beside its text rendering.
        if name == "prompt" and row.get("prompt_messages"):
            value = row["prompt_messages"]
        if isinstance(value, list):
            ok = all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                     for m in value)
            if not ok or not value:
                raise UserError(f"{where}: field {name!r} is a list but not of {{role, content}} messages")
            value = [{"role": m["role"], "content": m["content"]} for m in value]
        elif not isinstance(value, str):
            raise UserError(f"{where}: field {name!r} must be text or a message list, got {type(value).__name__}")
        records.append(PromptRecord(len(records), where, row, value, shown))
    return records


def _arrow_rows(path: Path) -> list[dict]:
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).read_all().to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not an Arrow IPC file ({exc})") from None


# --- the stage -------------------------------------------------------------------------


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


_NOT_COMPARED = ("model",)
"""Shown for the reader; resuming goes by the content identities below, never by a path."""
_CONTENT = {"model_identity": "a model", "prompts_sha256": "a prompts file"}


def content_settings(cfg) -> dict[str, Any]:
    """Everything that changes a completion (stored in each output row): the model, the sampler settings and the
    content identities of the model and the prompts file."""
    from pipeline.models import model_identity  # model code (torch) only when a run needs it

    return {"model": cfg.model, **sampler_settings(cfg),
            "model_identity": fingerprint_digest(model_identity(cfg.model)), "prompts_sha256": file_sha256(cfg.prompts)}


def _read_done(path: Path, records: list[PromptRecord], settings: dict[str, Any], *, tolerate_tail: bool) -> dict[int, dict]:
    """Finished rows of an earlier run, checked against these prompts and settings."""
    done: dict[int, dict] = {}
    for where, row in earlier_rows(path, tolerate_tail=tolerate_tail):
        if not isinstance(row, dict) or not isinstance(row.get("index"), int) or "sampler" not in row:
            raise UserError(f"{where}: not a `lldm-dpo generate` output row (no index/sampler); choose another --out")
        previous = row["sampler"] or {}
        check_settings(where, previous, settings, skip=(*_NOT_COMPARED, *_CONTENT))  # the content keys come last
        for key, what in _CONTENT.items():
            if previous.get(key) != settings[key]:
                raise UserError(f"{where}: made from {what} whose content differs from this run's "
                                f"({key} {previous.get(key)!r} vs {settings[key]!r}); delete the file or choose "
                                "another --out")
        index = row["index"]
        if index >= len(records):
            continue  # beyond --limit or a shorter prompts file: not ours to write back
        if row.get("prompt") != records[index].shown:
            raise UserError(f"{where}: row {index}'s prompt differs from {records[index].where}; a different prompts file? "
                            "delete the output or choose another --out")
        done[index] = row
    return done


def _output_row(record: PromptRecord, result: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    row = {"index": record.index, "prompt": record.shown,
           **{k: result[k] for k in ("completion", "completion_tokens", "stopped")}}
    for key, value in record.fields.items():
        row.setdefault(key, value)
    row["sampler"] = settings
    return row


def generate_completions(cfg) -> GenerateResult:
    """Completions for every prompt of ``cfg.prompts`` not already in ``cfg.out`` (generate's config: a
    ``SamplingArgs`` and its files, model and loading options), streamed to the partial file, then renamed into
    place sorted by index."""
    start_time = time.perf_counter()
    if not cfg.prompts:
        raise UserError("no prompts file given (--prompts FILE)")
    records = read_prompts(cfg.prompts, cfg.prompt_field)
    if cfg.limit:
        records = records[: cfg.limit]
    if cfg.scores:
        cfg = replace(cfg, chat_template=follow_cache(cfg.chat_template, open_cache(cfg.scores).fingerprint,
                                                      str(cfg.scores)))
    out = Path(cfg.out)
    partial = partial_path(out)
    check_writable(out, "generations file")
    check_replaceable(out, "--out")
    check_replaceable(partial, "--out")
    sweep_stale(out.parent, out.name)
    sweep_stale(out.parent, partial.name)
    settings = content_settings(cfg)
    done = _read_done(out, records, settings, tolerate_tail=False)
    done.update(_read_done(partial, records, settings, tolerate_tail=True))
    pending = [r for r in records if r.index not in done]
    resumed = len(records) - len(pending)

    generated_rows: list[dict[str, Any]] = []
    sample_seconds = 0.0
    if pending or partial.exists() or not out.exists():
        # Start the partial file from the finished rows (atomically), then append.
        write_jsonl(partial, (done[i] for i in sorted(done)))
        if pending:
            sample_seconds = _sample_into(cfg, pending, partial, settings, generated_rows)
        all_rows = {**done, **{row["index"]: row for row in generated_rows}}
        write_jsonl(out, (all_rows[i] for i in sorted(all_rows)))
        partial.unlink(missing_ok=True)
    else:
        all_rows = done

    rows = list(all_rows.values())
    return GenerateResult(
        out=str(out),
        prompts=len(records),
        generated_now=len(generated_rows),
        resumed=resumed,
        seconds=round(time.perf_counter() - start_time, 3),
        tokens_per_second=round(len(generated_rows) * cfg.gen_length / sample_seconds, 2) if sample_seconds else 0.0,
        stopped_fraction=round(sum(bool(r.get("stopped")) for r in rows) / len(rows), 4) if rows else 0.0,
        details={"settings": settings, "partial": str(partial)},
    )


def _sample_into(cfg, pending: list[PromptRecord], partial: Path, settings: dict, sink: list) -> float:
    model, tokenizer = load_for_sampling(cfg)
    by_index = {r.index: r for r in pending}
    started = time.perf_counter()
    with partial.open("a", encoding="utf-8") as stream, \
            progress_bar("generate", len(pending), enabled=cfg.progress, unit="prompts") as bar:

        def on_batch(results: list[dict[str, Any]]) -> None:
            rows = [_output_row(by_index[r["index"]], r, settings) for r in results]
            append_jsonl(stream, rows)
            sink.extend(rows)
            bar.advance(len(rows))

        # A pairs file's conversational row also carries its text rendering: the raw-text rule scores that.
        chat = resolve_chat_template(tokenizer, cfg.chat_template)
        prompts = [r.shown if isinstance(r.prompt, list) and not chat and isinstance(r.shown, str) else r.prompt
                   for r in pending]
        complete(model, tokenizer, prompts, cfg, chat_template=chat, indices=[r.index for r in pending],
                 on_batch=on_batch)
    return time.perf_counter() - started
