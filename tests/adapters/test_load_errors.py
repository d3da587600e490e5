"""Loading an adapter that is damaged, unsafe or of the wrong kind: one ModelError line naming the
file and what is wrong, the model left as it was; pickles that would run code are never run; a
LoRA rank that cannot fit in memory is refused before anything is allocated."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from adapter_testkit import logits, make_model, tokens

from tuneforge.adapters import LoraConfig, add_adapter, list_adapters, load_adapter, save_adapter
from tuneforge.adapters import sizes
from tuneforge.adapters.lora import LoraLayer
from tuneforge.errors import ConfigError, ModelError
from tuneforge.weightfiles import load_torch_file

MARKER = "pwned.txt"


@pytest.fixture
def saved(tmp_path):
    model = add_adapter(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return save_adapter(model, tmp_path / "a")


def _load_fails(path, match: str) -> str:
    model = make_model("llama")
    with pytest.raises(ModelError, match=match) as exc:
        load_adapter(model, path)
    message = str(exc.value)
    assert "\n" not in message
    assert not any(isinstance(m, LoraLayer) for m in model.modules()), "a failed load changed the model"
    assert list_adapters(model) == {}
    return message


# ---- pickles that run code ----------------------------------------------------------------------
class _Exec:
    def __reduce__(self):
        return (exec, (f"open({MARKER!r}, 'w').write('the pickle ran')",))


class _System:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class _Eval:
    def __reduce__(self):
        return (eval, (f"open({MARKER!r}, 'w')",))


def _torch_bytes(obj, zip_format: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def _runs_code(data: bytes, workdir) -> bool:
    """Does this torch.save file's pickle run code when unpickled without restrictions? Checked in
    another process, inside `workdir`, so the payload is known to be live before tuneforge sees it."""
    if data.startswith(b"PK"):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        script = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    else:  # the legacy format: a magic number and protocol pickled before the payload
        script = ("import pickle, sys; f = open(sys.argv[1], 'rb'); u = pickle.Unpickler(f)\n"
                  "for _ in range(4): u.load()")
    (workdir / "payload.pkl").write_bytes(data)
    subprocess.run([sys.executable, "-c", script, "payload.pkl"], cwd=workdir, capture_output=True, timeout=60)
    ran = (workdir / MARKER).exists()
    (workdir / MARKER).unlink(missing_ok=True)
    return ran


@pytest.mark.parametrize("payload", [_Exec, _System, _Eval], ids=["exec", "os.system", "eval"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_runs_code_is_refused_and_never_run(saved, tmp_path, monkeypatch, payload, zip_format):
    probe = tmp_path / "probe"
    probe.mkdir()
    data = _torch_bytes({"base_model.model.x": payload()}, zip_format)
    assert _runs_code(data, probe), "the test payload must be live, or this test proves nothing"

    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(data)
    monkeypatch.chdir(tmp_path)  # where the payload would write
    message = _load_fails(saved, "holds code or Python objects besides tensors")
    assert not (tmp_path / MARKER).exists(), "the pickle ran"
    assert "convert it to safetensors" in message and str(saved / "adapter_model.bin") in message
    assert "weights_only" not in message and "likely succeed" not in message


@pytest.mark.parametrize("payload", [_Exec, _System], ids=["exec", "os.system"])
def test_a_pt_file_that_runs_code_is_refused(tmp_path, monkeypatch, payload):
    path = tmp_path / "state.pt"
    path.write_bytes(_torch_bytes({"w": torch.zeros(2), "x": payload()}, zip_format=True))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="state.pt' holds code or Python objects") as exc:
        load_torch_file(path)
    assert "weights_only" not in str(exc.value) and not (tmp_path / MARKER).exists()


def test_a_plain_bin_adapter_still_loads(saved):
    """The refusal is for code: a .bin holding tensors only (peft's old format) loads as before."""
    from safetensors.torch import load_file

    tensors = load_file(str(saved / "adapter_model.safetensors"))
    (saved / "adapter_model.safetensors").unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    model = load_adapter(make_model("llama"), saved)
    assert list_adapters(model) and logits(model, tokens()).isfinite().all()


@pytest.mark.parametrize("content, match", [
    (pickle.dumps([1, 2, 3], protocol=2), "is a Python pickle but not a PyTorch weights file"),
    (b"hello, I am text", r"is not a PyTorch weights file \(it starts with b'hello, I'; it looks like text\)"),
    (b"", "is empty"),
])
def test_other_bin_files_say_what_they_are(saved, content, match):
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(content)
    _load_fails(saved, match)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_a_truncated_bin_is_named_as_truncated(saved, zip_format, keep):
    data = _torch_bytes({"base_model.model.x": torch.zeros(64, 64)}, zip_format)
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(data[: int(len(data) * keep)])
    _load_fails(saved, r"adapter_model.bin' is (truncated|damaged or truncated)")


def test_a_bin_holding_no_tensor_table(saved):
    (saved / "adapter_model.safetensors").unlink()
    torch.save([torch.zeros(2)], saved / "adapter_model.bin")
    _load_fails(saved, "holds no table of named tensors")


# ---- damaged safetensors --------------------------------------------------------------------------
def test_every_truncation_of_the_weights_is_named(saved):
    """Cut anywhere (inside the length, the header or the data): one line saying truncated/empty."""
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for cut in sorted({0, 3, 8, 20, header_end - 1, header_end, header_end + 5, len(data) - 1}):
        path.write_bytes(data[:cut])
        message = _load_fails(saved, "adapter_model.safetensors' is (truncated|empty|not a safetensors)")
        if cut > header_end:
            assert f"its header says {len(data)} bytes but the file has {cut}" in message


@pytest.mark.parametrize("content, match", [
    (b"<html><body>404</body></html>", "is not a safetensors file .*HTML"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 8192\n", "Git LFS pointer"),
    (b"PK\x03\x04" + b"\0" * 60, "is not a safetensors file .*zip archive"),
    ((12).to_bytes(8, "little") + b'["not", "a"]', "its header is not the JSON table"),
    ((20).to_bytes(8, "little") + b'{"x": {"dtype": 1}} ', "its header is not the JSON table"),
])
def test_files_that_are_not_safetensors(saved, content, match):
    (saved / "adapter_model.safetensors").write_bytes(content)
    _load_fails(saved, match)


def test_extra_bytes_after_the_data(saved):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data + b"\0" * 10)
    _load_fails(saved, f"is damaged: its header says {len(data)} bytes but the file has {len(data) + 10}")


def test_weights_that_are_a_folder(saved):
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.safetensors").mkdir()
    _load_fails(saved, "adapter_model.safetensors' is a folder, not a file")


# ---- adapter_config.json ------------------------------------------------------------------------
def _rewrite_config(saved, **changes):
    path = saved / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("key, value, match", [
    ("r", "4", "r must be a positive integer"),
    ("r", 0, "r must be a positive integer"),
    ("r", 2.5, "r must be a positive integer"),
    ("r", [4], "r must be a positive integer"),
    ("lora_alpha", "8", "lora_alpha must be a positive number"),
    ("lora_alpha", {"x": 1}, "lora_alpha must be a positive number"),
    ("lora_dropout", 1.5, "lora_dropout must be a number"),
    ("target_modules", 7, "target_modules must be a list"),
    ("target_modules", [1, 2], "target_modules"),
    ("modules_to_save", 3, "modules_to_save"),
    ("bias", 1, "bias must be one of"),
    ("use_dora", "yes", "use_dora must be true or false"),
    ("use_rslora", 1, "use_rslora must be true or false"),
    ("rank_pattern", ["q_proj"], "rank_pattern must be a dict"),
    ("rank_pattern", {"q_proj": "8"}, "rank_pattern"),
    ("alpha_pattern", {"q_proj": None}, "alpha_pattern"),
    ("layers_to_transform", "first", "layers_to_transform"),
    ("init_lora_weights", [1], "init_lora_weights"),
    ("peft_type", "POLY", "peft_type 'POLY' is not supported"),
])
def test_wrong_types_in_adapter_config(saved, key, value, match):
    _rewrite_config(saved, **{key: value})
    message = _load_fails(saved, match)
    assert message.startswith(f"adapter config '{saved / 'adapter_config.json'}'")


@pytest.mark.parametrize("content, match", [
    (b'{"r": 4,', "malformed JSON at line 1, column 9"),
    (b"[1, 2]", r"must hold a JSON object \(\{...\}\), not a list"),
    (b'"LORA"', "not a string"),
    (b"null", "not null"),
    ('{"r": 4, "base_model_name_or_path": "café"}'.encode("latin-1"), "is not UTF-8 text .*Latin-1"),
    ('{"r": 4}'.encode("utf-16"), "is not UTF-8 text .*UTF-16"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_unreadable_adapter_config(saved, content, match):
    (saved / "adapter_config.json").write_bytes(content)
    _load_fails(saved, match)


# ---- paths of the wrong kind -----------------------------------------------------------------------
def test_paths_of_the_wrong_kind(saved, tmp_path):
    _load_fails(saved / "adapter_model.safetensors", f"is a file, not an adapter folder; give its folder '{saved}'")
    _load_fails(saved / "adapter_config.json", "is a file, not an adapter folder")
    _load_fails(tmp_path / "nowhere", "does not exist")
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    _load_fails(model_dir, "is a model folder .*set it as model_name_or_path")
    (tmp_path / "empty").mkdir()
    _load_fails(tmp_path / "empty", "has no adapter_config.json")


def test_attach_adapters_checks_every_path_before_merging(saved, tmp_path):
    """adapter_name_or_path: a,b merges a first; a broken b must be reported before a is merged."""
    from tuneforge.models import attach_adapters

    model = make_model("llama")
    before = logits(model, tokens())
    with pytest.raises(ModelError, match="is a file, not an adapter folder"):
        attach_adapters(model, [str(saved), str(saved / "adapter_config.json")], trainable=False)
    torch.testing.assert_close(logits(model, tokens()), before)


# ---- ranks --------------------------------------------------------------------------------------
def test_an_absurd_rank_is_refused_before_allocating(monkeypatch):
    """10**9 would ask the allocator for terabytes (RuntimeError or MemoryError); it is refused
    from the layer sizes alone, and the model is not touched."""
    model = make_model("llama")
    with pytest.raises(ConfigError, match=r"LoRA rank 1000000000 does not fit in memory: .* 4 layers "
                       r"would take 1\.6 TB, more than this machine's memory; lower lora_rank"):
        add_adapter(model, LoraConfig(r=10**9, target_modules=["q_proj", "v_proj"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules()) and list_adapters(model) == {}


def test_the_memory_check_is_exact_at_its_limit(monkeypatch):
    """A (r, in) + B (out, r) in fp32 per layer: q_proj 64x64 and v_proj 64->32 in 2 layers."""
    need = lambda r: 4 * r * ((64 + 64) + (64 + 32)) * 2  # noqa: E731
    monkeypatch.setattr(sizes, "device_memory", lambda device: need(16))
    add_adapter(make_model("llama"), LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="LoRA rank 17 does not fit in memory"):
        add_adapter(make_model("llama"), LoraConfig(r=17, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="LoRA rank 40 does not fit"):  # rank_pattern counts too
        add_adapter(make_model("llama"), LoraConfig(r=4, rank_pattern={"q_proj": 40},
                                                    target_modules=["q_proj", "v_proj"]))


def test_an_absurd_rank_in_adapter_config_is_refused(saved):
    _rewrite_config(saved, r=10**9)
    _load_fails(saved, "cannot be added to LlamaForCausalLM: LoRA rank 1000000000 does not fit in memory")


def test_a_rank_above_the_layer_dims_warns_once_and_still_works(saved, caplog):
    """peft allows r > min(in, out); the update's rank cannot exceed min(in, out), which one warning says."""
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        model = add_adapter(make_model("llama"), LoraConfig(r=48, target_modules=["q_proj", "v_proj"]))
    warned = [r.getMessage() for r in caplog.records if "rank" in r.getMessage()]
    assert len(warned) == 1
    assert ("LoRA rank 48 is larger than 2 adapted layer(s) can use (e.g. model.layers.0.self_attn.v_proj: "
            "64 in, 32 out)") in warned[0] and "min(in, out) = 32" in warned[0]
    assert logits(model, tokens()).isfinite().all()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        add_adapter(make_model("llama"), LoraConfig(r=32, target_modules=["q_proj", "v_proj"]))
    assert not [r for r in caplog.records if "rank" in r.getMessage()]


def test_a_config_without_peft_type_is_refused_naming_the_field(saved):
    raw = json.loads((saved / "adapter_config.json").read_text())
    del raw["peft_type"]
    (saved / "adapter_config.json").write_text(json.dumps(raw))
    _load_fails(saved, r"adapter_config.json. names no peft_type \(the adapter method\); add the one it was "
                       r"trained with \(LORA, .*IA3, .*UNIPELT.*\), e.g. \"peft_type\": \"LORA\"$")
