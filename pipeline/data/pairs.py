"""Preference-pair validation, normalisation, ``pair_id`` and the eval split (pure functions).

A record becomes a ``Pair`` or raises ``Invalid(reason, message)`` with one of
``schemas.REASON_CODES``. The checks run in a fixed order so a record with
several problems always gets the same reason:

    wrong_type (record) -> missing_field -> wrong_type (field) -> malformed_messages
    -> empty_text -> identical_responses -> too_long

(``invalid_json``/``invalid_utf8`` come from the readers, ``duplicate_pair``
from the caller, which remembers the ``pair_id``s it has accepted.)

Formats, as TRL names them:
- standard: ``prompt``, ``chosen``, ``rejected`` strings;
- conversational: lists of ``{"role", "content"}`` messages. With an explicit
  prompt (a message list, or a string taken as one user message) chosen and
  rejected are the responses; with no prompt field the longest shared leading
  run of messages of chosen and rejected is the prompt (implicit prompt) and
  the rest are the responses.
- whole conversations beside an explicit prompt (UltraFeedback-binarized: a
  string ``prompt`` and chosen/rejected that repeat it as their first user
  turn): the repeated prompt turns are removed, so chosen and rejected hold
  only the completion. When both conversations begin with the same
  non-assistant turns that do not start with the prompt, a string prompt that
  equals one of those user turns makes the shared turns the prompt (so a
  system turn before it is kept, as TRL's implicit prompt would); otherwise the
  record is ``malformed_messages`` (prompt and conversations disagree).
- Anthropic HH strings (``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` in chosen and
  rejected, no prompt field): the turns become user/assistant messages and the
  shared leading turns are the prompt, so the chat template applies downstream.

Normalisation (for ``pair_id``, duplicates and the split, never for the stored
text): Unicode NFC, CRLF/CR to LF, leading/trailing whitespace stripped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.arrow_build import bool_array, bools_of, int64_array, ints_of, scalar, string_offsets

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_ID_VERSION = "pairs/v1"  # bump only together with a deliberate change of every pair_id


class Invalid(Exception):
    """A record that cannot become a pair; ``reason`` is a ``schemas.REASON_CODES`` entry."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class FieldMap:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"

    @property
    def names(self) -> tuple[str, str, str]:
        return self.prompt, self.chosen, self.rejected


@dataclass(slots=True)
class Pair:
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    prompt_messages: list[dict] | None
    chosen_messages: list[dict] | None
    rejected_messages: list[dict] | None
    prompt_key: str
    """The normalized prompt (text, or its canonical encoding for messages): what the eval split hashes."""


def normalize_text(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return text.strip()


def _canon(obj: Any) -> str:
    """Unambiguous length-prefixed encoding of a normalized text or [[role, content], ...] list.

    Lengths count UTF-8 bytes, so the same bytes can be produced by SQL
    (``strlen``) in the bulk path. (Cheaper than canonical JSON, which matters
    at hundreds of thousands of pairs.)
    """
    if isinstance(obj, str):
        return f"s{len(obj.encode('utf-8', 'surrogatepass')) if not obj.isascii() else len(obj)}:{obj}"
    return f"m{len(obj)}:" + "".join(_canon(role) + _canon(content) for role, content in obj)


def _md5_hex(text: str) -> str:
    # md5 as a content fingerprint (not for security): DuckDB computes the same digest in bulk.
    return hashlib.md5(text.encode("utf-8", "surrogatepass")).hexdigest()


def pair_id_of(prompt_norm: Any, chosen_norm: Any, rejected_norm: Any) -> str:
    """128-bit hex digest (md5) of the normalized content (strings, or [[role, content], ...] lists)."""
    return _md5_hex(_ID_VERSION + _canon(prompt_norm) + _canon(chosen_norm) + _canon(rejected_norm))


def split_from_hash(digest_hex: str, eval_fraction: float) -> str:
    return "eval" if int(digest_hex[:16], 16) / 2.0**64 < eval_fraction else "train"


def split_of(prompt_key: str, eval_fraction: float) -> str:
    """``eval`` for a deterministic ``eval_fraction`` of prompts (by hash), else ``train``.

    Depends on the prompt alone, so every pair sharing a prompt lands on the
    same side, and a prompt's side never changes between runs or machines.
    """
    if eval_fraction <= 0.0:
        return "train"
    return split_from_hash(_md5_hex("split:" + prompt_key), eval_fraction)


_EVAL_SPLIT_PREFIXES = ("test", "validation", "valid", "eval", "dev")


def declared_split(name: Any) -> str:
    """What a split name given by the input (a DatasetDict split, or a split field) means: ``train`` or ``eval``.

    Names starting with ``test``/``validation``/``valid``/``eval``/``dev`` (any
    case) are ``eval``: held out whatever ``--eval-fraction`` says. Names starting
    with ``train`` are ``train``: the caller still holds out ``eval_fraction`` of
    their prompts (``split_of``), as for inputs without splits. Anything else
    raises ``ValueError`` (the caller names the file and record).
    """
    if not isinstance(name, str):
        raise ValueError(f"split is a {_type_name(name)}, expected a split name")
    low = name.strip().lower()
    if low.startswith(_EVAL_SPLIT_PREFIXES):
        return "eval"
    if low.startswith("train"):
        return "train"
    raise ValueError(
        f"split '{name}' is neither a train split (train...) nor an eval split ({'..., '.join(_EVAL_SPLIT_PREFIXES)}...)"
    )


_TYPE_NAMES = {type(None): "null", dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
               float: "number"}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _check_messages(value: list, field: str) -> list[dict]:
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise Invalid("malformed_messages", f"field '{field}' message {i} is a {_type_name(msg)}, expected an object with role and content")
        role = msg.get("role")
        content = msg.get("content")
        if not isinstance(role, str):
            raise Invalid("malformed_messages", f"field '{field}' message {i} has no string 'role'")
        if role not in ROLES:
            raise Invalid("malformed_messages", f"field '{field}' message {i} has unknown role '{role}' (known: {', '.join(sorted(ROLES))})")
        if not isinstance(content, str):
            raise Invalid("malformed_messages", f"field '{field}' message {i} has no string 'content' (got {_type_name(content)})")
        out.append({"role": role, "content": content})
    return out


def render_messages(messages: list[dict]) -> str:
    """Readable text of a conversation: a lone message is its content, else ``role: content`` blocks."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _norm_messages(messages: list[dict]) -> list[list[str]]:
    return [[m["role"], normalize_text(m["content"])] for m in messages]


def validate_record(value: Any, fields: FieldMap = FieldMap(), max_chars: int = 0) -> Pair:
    """Turn one parsed record into a ``Pair`` or raise ``Invalid``."""
    if not isinstance(value, dict):
        raise Invalid("wrong_type", f"record is a JSON {_type_name(value)}, expected an object")
    chosen = value.get(fields.chosen)
    rejected = value.get(fields.rejected)
    prompt = value.get(fields.prompt)
    for name, v in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if v is None:
            raise Invalid("missing_field", f"field '{name}' is {'null' if name in value else 'missing'}")

    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            chosen_m, rejected_m = hh_messages(chosen), hh_messages(rejected)
            if chosen_m is not None and rejected_m is not None:
                return _conversational(None, chosen_m, rejected_m, fields, max_chars)
            missing = f"field '{fields.prompt}' is {'null' if fields.prompt in value else 'missing'}"
            if chosen_m is not None or rejected_m is not None:
                half = fields.chosen if chosen_m is None else fields.rejected
                missing += f" and field '{half}' is not an Anthropic HH transcript like the other to take it from"
            raise Invalid("missing_field", missing)
        if not isinstance(prompt, str):
            raise Invalid("wrong_type", f"field '{fields.prompt}' is a {_type_name(prompt)}, expected a string like '{fields.chosen}'")
        return _standard(prompt, chosen, rejected, fields, max_chars)
    if isinstance(chosen, list) and isinstance(rejected, list):
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise Invalid("wrong_type", f"field '{fields.prompt}' is a {_type_name(prompt)}, expected a string or a list of messages")
        return _conversational(prompt, chosen, rejected, fields, max_chars)
    for name, v in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if not isinstance(v, (str, list)):
            raise Invalid("wrong_type", f"field '{name}' is a {_type_name(v)}, expected a string or a list of messages")
    raise Invalid("wrong_type", f"fields '{fields.chosen}' ({_type_name(chosen)}) and '{fields.rejected}' "
                                f"({_type_name(rejected)}) must both be strings or both message lists")


def _standard(prompt: str, chosen: str, rejected: str, fields: FieldMap, max_chars: int) -> Pair:
    texts = (prompt, chosen, rejected)
    p, c, r = norms = [normalize_text(text) for text in texts]
    for name, norm in zip(fields.names, norms):
        if not norm:
            raise Invalid("empty_text", f"field '{name}' is empty or whitespace only")
    if c == r:
        raise Invalid("identical_responses", f"fields '{fields.chosen}' and '{fields.rejected}' are identical")
    _check_length(zip(fields.names, texts), max_chars)
    return Pair(pair_id_of(p, c, r), *texts, None, None, None, p)


def _conversational(prompt: Any, chosen: list, rejected: list, fields: FieldMap, max_chars: int) -> Pair:
    chosen_m = _check_messages(chosen, fields.chosen)
    rejected_m = _check_messages(rejected, fields.rejected)
    if prompt is None:
        k = _shared_prefix(chosen_m, rejected_m)  # implicit prompt: the shared leading messages (TRL's extract_prompt)
        if k == len(chosen_m) == len(rejected_m):
            raise Invalid("identical_responses", f"fields '{fields.chosen}' and '{fields.rejected}' are identical conversations")
        if k == 0:
            raise Invalid("missing_field", f"field '{fields.prompt}' is missing and '{fields.chosen}'/'{fields.rejected}' "
                                           "share no leading messages to use as the prompt")
        prompt_m, chosen_m, rejected_m = chosen_m[:k], chosen_m[k:], rejected_m[k:]
    else:
        prompt_m = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_messages(prompt, fields.prompt)
        prompt_m, chosen_m, rejected_m = _drop_repeated_prompt(prompt, prompt_m, chosen_m, rejected_m, fields)
    for name, msgs in ((fields.chosen, chosen_m), (fields.rejected, rejected_m)):
        if not any(m["role"] == "assistant" for m in msgs):
            raise Invalid("malformed_messages", f"field '{name}' has no assistant turn after the prompt")

    p_norm, c_norm, r_norm = norms = [_norm_messages(m) for m in (prompt_m, chosen_m, rejected_m)]
    for name, norm in zip(fields.names, norms):
        if not norm or not any(content for _, content in norm):
            raise Invalid("empty_text", f"field '{name}' has no non-blank message content")
    if c_norm == r_norm:
        raise Invalid("identical_responses", f"fields '{fields.chosen}' and '{fields.rejected}' are identical after the prompt")
    texts = (render_messages(prompt_m), render_messages(chosen_m), render_messages(rejected_m))
    _check_length(zip(fields.names, texts), max_chars)
    return Pair(pair_id_of(p_norm, c_norm, r_norm), *texts, prompt_m, chosen_m, rejected_m, _canon(p_norm))


def _shared_prefix(a: list, b: list) -> int:
    """How many leading messages ``a`` and ``b`` share."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _drop_repeated_prompt(prompt: Any, prompt_m: list, chosen_m: list, rejected_m: list, fields: FieldMap):
    """``(prompt, chosen, rejected)`` messages with the prompt turns that chosen/rejected repeat removed.

    Rendering ``prompt + chosen`` through a chat template must start with the
    rendering of ``prompt``; a conversation that repeats the prompt's user turn
    breaks that (two user turns in a row), so the repeat is removed here.
    """
    n = len(prompt_m)
    p_norm = _norm_messages(prompt_m)
    c_rep = n > 0 and _norm_messages(chosen_m[:n]) == p_norm
    r_rep = n > 0 and _norm_messages(rejected_m[:n]) == p_norm
    if c_rep or r_rep:
        return prompt_m, chosen_m[n:] if c_rep else chosen_m, rejected_m[n:] if r_rep else rejected_m
    k = _shared_prefix(chosen_m, rejected_m)
    if k == 0 or chosen_m[0]["role"] == "assistant":
        return prompt_m, chosen_m, rejected_m  # the responses, as given
    if isinstance(prompt, str):
        key = normalize_text(prompt)
        if any(m["role"] == "user" and normalize_text(m["content"]) == key for m in chosen_m[:k]):
            return chosen_m[:k], chosen_m[k:], rejected_m[k:]
    raise Invalid("malformed_messages", f"fields '{fields.chosen}' and '{fields.rejected}' both begin with {k} "
                                        f"non-assistant message(s) that do not repeat field '{fields.prompt}'")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(text: str) -> list[dict] | None:
    """The turns of an Anthropic HH transcript (``"\\n\\nHuman: q\\n\\nAssistant: a"``) as
    user/assistant messages; ``None`` when ``text`` is not one (it must open with a
    Human turn and hold an Assistant turn)."""
    body = text.lstrip()
    if not body.startswith("Human:") or "\n\nAssistant:" not in body:
        return None
    parts = _HH_TURN.split("\n\n" + body)
    # ['', 'Human', content, 'Assistant', content, ...]
    return [{"role": _HH_ROLES[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def _check_length(named_texts, max_chars: int) -> None:
    for name, text in named_texts:
        if 0 < max_chars < len(text):  # max_chars 0: no limit
            raise Invalid("too_long", f"field '{name}' has {len(text)} characters, over max_chars {max_chars}")


def kept_value(value: Any) -> str | None:
    """A ``--keep-field`` value as a string column cell: strings as they are, other values as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


# What ``str.strip()`` removes (``str.isspace`` code points); a test checks it against Python's own table.
UNICODE_WS = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


# Bytes that can start / end a whitespace character (``UNICODE_WS`` in UTF-8), as lookup tables.
_WS_FIRST, _WS_LAST = np.zeros(256, dtype=bool), np.zeros(256, dtype=bool)
_WS_FIRST[[c.encode("utf-8")[0] for c in UNICODE_WS]] = _WS_LAST[[c.encode("utf-8")[-1] for c in UNICODE_WS]] = True


def _may_need_strip(col) -> bool:
    """False when no (non-null) string of ``col`` can start or end with whitespace, judged
    from raw bytes: stripping copies every text, and almost no row needs it."""
    if not len(col) or not pa.types.is_string(col.type) or col.buffers()[2] is None:
        return True
    offsets = string_offsets(col)
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8)
    starts, ends = offsets[:-1], offsets[1:]
    if col.null_count:
        valid = bools_of(col.is_valid())
        starts, ends = starts[valid], ends[valid]
    if (starts >= ends).any():  # an empty text: let the exact strip decide (cheap, rare)
        return True
    return bool(_WS_FIRST[data[starts]].any() or _WS_LAST[data[ends - 1]].any())


def arrow_clean_mask(prompt, chosen, rejected, max_chars: int = 0, may_have_cr=True):
    """Vectorized check over Arrow string arrays for standard-format rows: ``(mask, normalized)``.

    ``mask`` is True where ``validate_record`` would certainly accept the row:
    all three texts present, free of ``\\r``, already in NFC (ASCII, or checked
    with ``unicodedata.is_normalized`` on the few non-ASCII texts), so that
    normalization is just ``strip()``; non-empty after stripping, chosen !=
    rejected, within ``max_chars``. ``normalized`` are the three stripped
    arrays (for ``arrow_pair_ids``/``split_of``). Rows outside the mask are not
    judged here: the caller sends them through ``validate_record``, which gives
    the reason. ``may_have_cr=False`` (the caller saw no CR, escaped or not, in
    the raw JSON) skips the costly substring scan; an array of row numbers limits it to those rows.
    """
    n = len(prompt)
    conds, normalized = [], []
    for col in (prompt, chosen, rejected):
        stripped = pc.utf8_trim(col, characters=UNICODE_WS) if _may_need_strip(col) else col
        normalized.append(stripped)
        conds.append(pc.greater(pc.binary_length(stripped), scalar(0, pa.int32())))  # False (null) when missing
        if may_have_cr is True:
            conds.append(pc.invert(pc.match_substring(col, "\r")))
        elif may_have_cr is not False and len(may_have_cr):
            rows = np.asarray(may_have_cr, dtype=np.int64)
            has_cr = bools_of(pc.match_substring(pc.take(col, int64_array(rows)), "\r"))
            if has_cr.any():
                conds.append(_all_but(n, rows[has_cr]))
        if max_chars > 0:
            conds.append(pc.less_equal(pc.utf8_length(col), scalar(max_chars, pa.int64())))
        non_ascii = pc.fill_null(pc.invert(pc.string_is_ascii(col)), _FALSE)
        if pc.any(non_ascii).as_py():
            idx = pc.indices_nonzero(non_ascii)
            texts = pc.take(col, idx)
            if not _all_nfc(texts):  # some text is not: find which, one by one
                nfc = np.array([unicodedata.is_normalized("NFC", t) for t in texts.to_pylist()], dtype=bool)
                conds.append(_all_but(n, ints_of(idx)[~nfc]))
    conds.append(pc.not_equal(normalized[1], normalized[2]))
    return pc.fill_null(functools.reduce(pc.and_, conds), _FALSE), normalized


_FALSE = scalar(False)


def _all_nfc(texts: pa.Array) -> bool:
    """Whether every text of a string array (no nulls) is in NFC, asked once of all of them joined by newlines.

    A newline is a starter that composes with nothing and no reordering crosses a starter, so
    ``NFC(a + "\\n" + b) == NFC(a) + "\\n" + NFC(b)``: the joined text is in NFC exactly when every text is. One
    call instead of one per text (tens of thousands of Python strings per chunk).
    """
    joined = pc.binary_join_element_wise(texts, scalar("\n"), scalar(""))  # each text followed by a newline
    offsets = string_offsets(joined)
    data = joined.buffers()[2]
    return unicodedata.is_normalized("NFC", str(memoryview(data)[offsets[0] : offsets[-1]], "utf-8"))


def _all_but(n: int, rows: np.ndarray) -> pa.Array:
    """A boolean array of ``n`` True values, False at ``rows``."""
    ok = np.ones(n, dtype=bool)
    ok[rows] = False
    return bool_array(ok)


try:  # CPython's own md5: the same digests, with a quarter of OpenSSL's set-up cost per (short) message
    from _md5 import md5 as _md5
except ImportError:  # a build without it
    _md5 = hashlib.md5


def _md5_digests(texts) -> bytes:
    """The 16-byte md5 digests of every string of an Arrow string array, concatenated, hashed straight from its
    buffer (C loops: no Python frame per row)."""
    texts = texts.combine_chunks() if hasattr(texts, "combine_chunks") else texts
    offsets = string_offsets(texts).tolist()
    data = memoryview(texts.buffers()[2] or b"")
    pieces = map(data.__getitem__, map(slice, offsets[:-1], offsets[1:]))
    return b"".join(map(operator.methodcaller("digest"), map(_md5, pieces)))


def _hex_array(digests: bytes) -> pa.Array:
    """32-character lowercase hex strings (``hexdigest``) of 16-byte digests, as an Arrow string array built from
    buffers."""
    n = len(digests) // 16
    offsets = np.arange(0, 32 * (n + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(digests.hex().encode("ascii")))


def arrow_pair_id_array(prompt_norm, chosen_norm, rejected_norm) -> pa.Array:
    """``pair_id_of`` for rows of normalized Arrow string arrays (no nulls), computed in bulk, as a string array."""
    # The canonical text of every row in one join (one copy): version, then ``s<bytes>:<text>`` per field.
    parts: list = [scalar(_ID_VERSION + "s")]
    for i, col in enumerate((prompt_norm, chosen_norm, rejected_norm)):
        parts += [*([scalar("s")] if i else []), pc.cast(pc.binary_length(col), pa.string()), scalar(":"), col]
    return _hex_array(_md5_digests(pc.binary_join_element_wise(*parts, scalar(""))))


def arrow_pair_ids(prompt_norm, chosen_norm, rejected_norm) -> list[str]:
    """``pair_id_of`` for rows of normalized Arrow string arrays (no nulls), computed in bulk."""
    return arrow_pair_id_array(prompt_norm, chosen_norm, rejected_norm).to_pylist()


def arrow_eval_mask(prompt_norm, eval_fraction: float) -> np.ndarray:
    """Where ``split_of`` is ``eval``, for rows of a normalized Arrow string array of prompts (no nulls)."""
    if eval_fraction <= 0.0:
        return np.zeros(len(prompt_norm), dtype=bool)
    keys = pc.binary_join_element_wise(scalar("split:"), prompt_norm, scalar(""))  # a standard prompt_key
    # split_from_hash on the digest's first 8 bytes (big-endian), rounded to float64 as Python's int / float does.
    head = np.frombuffer(_md5_digests(keys), dtype=">u8")[::2]
    return np.array([int(h) / 2.0**64 < eval_fraction for h in head.tolist()], dtype=bool)


def arrow_splits(prompt_norm, eval_fraction: float) -> list[str]:
    """``split_of`` for rows of a normalized Arrow string array of prompts (no nulls)."""
    return ["eval" if e else "train" for e in arrow_eval_mask(prompt_norm, eval_fraction).tolist()]
