"""A broken chat template (a Jinja syntax error, or one that raises) is one line naming the template
and the file it came from, the same way in training, chat, eval and the API: every render goes
through data.templates.render_chat, and apply_template (which train, chat, eval, export and the
API all call when they load the tokenizer) first renders one user message with it."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from tuneforge.data import load_datasets
from tuneforge.data.templates import TemplateRefused, apply_template, render_chat, template_hint
from tuneforge.errors import DataError, ModelError
from tuneforge.infer.generation import chat_input_ids

HINT = template_hint()  # the named templates, as the messages name them
HI = [{"role": "user", "content": "hi"}]


def make_args(**values) -> SimpleNamespace:
    """The DataArguments fields load_datasets reads."""
    return SimpleNamespace(**{**dict(dataset=None, eval_dataset=None, dataset_dir=None, template=None,
                                     cutoff_len=256, max_samples=None, val_size=0.0, train_on_prompt=False,
                                     mask_history=False, placeholders=None), **values})


@pytest.fixture
def folder(tiny_model_dir, tmp_path):
    """A copy of the tiny model's tokenizer files (with SmolLM2's chat_template.jinja)."""
    out = tmp_path / "model"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, out / name)
    return out


def _tokenizer(folder, template: str | None = None, in_config: bool = False):
    if template is not None and in_config:
        (folder / "chat_template.jinja").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    elif template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("template,reason", [
    ("{% for m in messages %}{{ m.content }{% endfor %}",
     "unexpected '}' (a syntax error at line 1 of the template)"),
    ("{% for m in messages %}\n{{ m['content'] }}\n{% endfor", "unexpected end of template, expected 'end of "
     "statement block'. (a syntax error at line 3 of the template)"),
    ('{{ raise_exception("this template is broken") }}', "this template is broken"),
    ("{{ messages[5]['content'] }}", "list object has no element 5"),
])
def test_a_broken_own_template_is_refused_when_loaded_naming_its_file(folder, template, reason):
    tokenizer = _tokenizer(folder, template)
    with pytest.raises(TemplateRefused) as err:
        apply_template(tokenizer, None)
    assert str(err.value) == (f"the tokenizer's own chat template ('{folder / 'chat_template.jinja'}') cannot "
                              f"render a single user message: {reason}; fix it or set template: to {HINT}")
    assert isinstance(err.value, ModelError) and err.value.reason == reason


def test_a_template_kept_in_tokenizer_config_names_that_file(folder):
    tokenizer = _tokenizer(folder, "{% if messages %}{{ messages[0].content }}", in_config=True)
    with pytest.raises(TemplateRefused, match=f"^the tokenizer's own chat template "
                                              f"\\('{folder / 'tokenizer_config.json'}'\\) cannot render"):
        apply_template(tokenizer, None)


def test_a_named_template_replaces_a_broken_own_one(folder):
    tokenizer = _tokenizer(folder, "{{ broken }")
    assert "<|im_start|>" in apply_template(tokenizer, "chatml")
    assert render_chat(tokenizer, HI, add_generation_prompt=True).endswith("<|im_start|>assistant\n")


REFUSES_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                  "{% endif %}{{ m['content'] }}\n{% endfor %}")


def test_chat_prompts_go_through_the_same_render(folder):
    tokenizer = _tokenizer(folder, REFUSES_SYSTEM)
    apply_template(tokenizer, None)  # one user message renders: the template loads
    assert chat_input_ids(tokenizer, HI).shape[0] == 1
    with pytest.raises(TemplateRefused) as err:
        chat_input_ids(tokenizer, HI, system="be brief")
    assert err.value.reason == "no system role"
    assert str(err.value).startswith(f"the tokenizer's own chat template ('{folder / 'chat_template.jinja'}') "
                                     "cannot render these messages: no system role; fix it or set template:")


def test_training_names_the_record_a_template_refuses(folder, tmp_path):
    tokenizer = _tokenizer(folder, REFUSES_SYSTEM)
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.json").write_text(json.dumps([{"instruction": "hi", "output": "ok"},
                                             {"instruction": "hi", "output": "ok", "system": "be brief"}]))
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json",
                                                              "columns": {"system": "system"}}}))
    with pytest.raises(DataError) as err:
        load_datasets(make_args(dataset="d", dataset_dir=str(data)), tokenizer)
    assert str(err.value) == (f"the tokenizer's own chat template ('{folder / 'chat_template.jinja'}') cannot "
                              f"render dataset 'd' ('{data / 'd.json'}' record 1): no system role; fix the record "
                              f"or set template: to {HINT}")


def test_training_refuses_a_broken_template_before_reading_records(folder, tmp_path):
    tokenizer = _tokenizer(folder, "{{ m.content }")
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "missing.json"}}))
    with pytest.raises(TemplateRefused, match="cannot render a single user message: unexpected '}'"):
        load_datasets(make_args(dataset="d", dataset_dir=str(data)), tokenizer)
