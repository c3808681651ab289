"""generate's prompt files: every bad line named."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UserError
from pipeline.sampling.generate_run import read_prompts


@pytest.mark.parametrize(
    "content,message",
    [('{"text": "no prompt here"}\n', "p.jsonl:1: no 'prompt' or 'question' field"),
     ('{"prompt": "ok"}\n{"prompt": 5}\n', "p.jsonl:2: field 'prompt' must be text"),
     ('{"prompt": "ok"}\nnot json\n', "p.jsonl:2: invalid JSON")],
)
def test_bad_prompt_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_prompts(path)



