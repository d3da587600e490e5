"""Weight files read safely: safetensors and GGUF headers are checked against the file's size
before anything is loaded, so a truncated or mislabelled file is named with what is wrong, and
pickles (.bin / .pt) are only ever loaded with torch's `weights_only` unpickler; one that holds
code or other Python objects is refused in one line.

Every failure is one `ModelError` line (or the `error` class given) naming the file. Imports only
the standard library, `tuneforge.errors` and `tuneforge.fileio`; torch and safetensors are imported
when a file is loaded.
"""

from __future__ import annotations

import json
import mmap
import pickle
import re
import warnings
import zipfile
from pathlib import Path

from .errors import ModelError, TuneforgeError
from .fileio import SAFETENSORS_MAX_HEADER, describe_os_error, one_line, quoted, read_json, sniff

_AGAIN = "download, copy or save it again"


def _stat_size(path: Path, what: str, error: type[TuneforgeError]) -> int:
    try:
        if path.is_dir():
            raise error(f"{what} '{path}' is a folder, not a file; give the path of the file")
        return path.stat().st_size
    except OSError as exc:
        raise error(f"{what} {describe_os_error(exc, 'read')}") from None


def _looks_like(head: bytes) -> str:
    """What a file that starts with `head` (its first 32 bytes) looks like, as a clause."""
    signature = sniff(head)
    if signature is not None:
        return f"; it looks like {signature.name}"
    if head and all(32 <= c < 127 or c in b"\t\r\n" for c in head):
        return "; it looks like text"
    return ""


# ---- safetensors ----------------------------------------------------------------------------------
def check_safetensors(path: str | Path, what: str = "weights file",
                      error: type[TuneforgeError] = ModelError) -> None:
    """Check a .safetensors file's header against the file without loading any tensor.

    Raises `error` (one line naming the file) when it is missing, empty, not safetensors, has a
    malformed header, or is shorter (truncated) or longer than its header says.
    """
    path = Path(path)
    size = _stat_size(path, what, error)
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
            length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
            fh.seek(8)
            header = fh.read(length) if 0 < length <= min(SAFETENSORS_MAX_HEADER, size - 8) else b""
    except OSError as exc:
        raise error(f"{what} {describe_os_error(exc, 'read')}") from None
    where = f"{what} '{path}'"
    if size == 0:
        raise error(f"{where} is empty; {_AGAIN}")
    if size < 8 or length == 0 or length > SAFETENSORS_MAX_HEADER or (
            length > size - 8 and head[8:9] not in (b"{", b"")):  # safetensors headers are JSON objects
        raise error(f"{where} is not a safetensors file (it does not start with a safetensors header"
                    f"{_looks_like(head)}); {_AGAIN}")
    if length > size - 8:
        raise error(f"{where} is truncated: its header says the header alone is {length + 8} bytes "
                    f"but the file has {size}; {_AGAIN}")
    end = _safetensors_end(header)
    if end is None:
        raise error(f"{where} is not a safetensors file (its header is not the JSON table of "
                    f"tensors safetensors writes); {_AGAIN}")
    expected = 8 + length + end
    if size < expected:
        raise error(f"{where} is truncated: its header says {expected} bytes but the file has {size}; "
                    f"{_AGAIN}")
    if size > expected:
        raise error(f"{where} is damaged: its header says {expected} bytes but the file has {size} "
                    f"(extra data at the end); {_AGAIN}")


def _safetensors_end(header: bytes) -> int | None:
    """The end of the data section the header describes, or None for a header that is not one."""
    try:
        table = json.loads(header.decode("utf-8").rstrip(" "))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(table, dict):
        return None
    end = 0
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            return None
        end = max(end, offsets[1])
    return end


def load_safetensors(path: str | Path, what: str = "weights file",
                     error: type[TuneforgeError] = ModelError, device: str = "cpu") -> dict:
    """{name: tensor} of a .safetensors file, after `check_safetensors`; any other failure of the
    safetensors library (a damaged tensor table) is one `error` line naming the file."""
    from safetensors.torch import load_file

    check_safetensors(path, what, error)
    try:
        return load_file(str(path), device=str(device))
    except OSError as exc:
        raise error(f"{what} {describe_os_error(exc, 'read')}") from None
    except Exception as exc:  # the library's own error types (SafetensorError, ...) for a bad table
        raise error(f"{what} '{path}' is damaged ({one_line(exc)}); {_AGAIN}") from None


# ---- pickles (torch.save files) -------------------------------------------------------------------
def refused_pickle(path: str | Path, what: str = "weights file", detail: str = "") -> str:
    """The one line for a pickle the weights-only unpickler refused."""
    found = re.search(r"GLOBAL ([\w.]+)", detail)
    calls = f" (it asks for {found.group(1)})" if found else ""
    return (f"{what} '{path}' holds code or Python objects besides tensors{calls}, which tuneforge "
            "will not load (for safety); if you trust it, convert it to safetensors in a trusted "
            "environment and use that file")


def check_torch_file(path: str | Path, what: str = "weights file",
                     error: type[TuneforgeError] = ModelError) -> None:
    """What can be told of a torch.save file without unpickling it: raises `error` (one line)
    when it is missing, empty, not a torch.save file, or a zip whose directory is cut off."""
    path = Path(path)
    size = _stat_size(path, what, error)
    where = f"{what} '{path}'"
    if size == 0:
        raise error(f"{where} is empty; {_AGAIN}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError as exc:
        raise error(f"{what} {describe_os_error(exc, 'read')}") from None
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        raise error(f"{where} is truncated: its zip directory (the end of a torch.save file) is "
                    f"missing; {_AGAIN}")
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise error(f"{where} is not a PyTorch weights file (it starts with {head[:8]!r}"
                    f"{_looks_like(head)}); {_AGAIN}")


def load_torch_file(path: str | Path, what: str = "weights file",
                    error: type[TuneforgeError] = ModelError):
    """`torch.load(path, map_location='cpu', weights_only=True)` whose failures are one `error`
    line naming the file: missing, empty, truncated, not a torch file, or a pickle that would run
    code or build objects other than tensors (refused; never loaded another way)."""
    import torch

    path = Path(path)
    where = f"{what} '{path}'"
    check_torch_file(path, what, error)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then reads anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error(refused_pickle(path, what, str(exc))) from None
    except EOFError:
        raise error(f"{where} is truncated: its pickle ends too early; {_AGAIN}") from None
    except RuntimeError as exc:
        if "magic number" in str(exc):  # a pickle, but not the layout torch.save writes
            raise error(f"{where} is a Python pickle but not a PyTorch weights file (torch.save "
                        f"did not write it); {_AGAIN}") from None
        raise error(f"{where} is damaged or truncated ({one_line(exc, 160)}); {_AGAIN}") from None
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise error(f"{where} is damaged or truncated ({type(exc).__name__}: {one_line(exc, 160)}); "
                    f"{_AGAIN}") from None


# ---- GGUF -----------------------------------------------------------------------------------------
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Cut(Exception):
    """The header runs past the end of the file."""


class _Bad(Exception):
    """The header holds something GGUF does not allow."""


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def skip(self, n: int) -> int:
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.buf):
            raise _Cut
        return start

    def uint(self, n: int) -> int:
        start = self.skip(n)
        return int.from_bytes(self.buf[start:self.pos], "little")

    def string(self) -> bytes:
        n = self.uint(8)
        start = self.skip(n)
        return bytes(self.buf[start:self.pos])

    def value(self, kind: int) -> int | None:
        """Skip one metadata value; an unsigned integer's value is returned (general.alignment)."""
        if kind in _GGUF_SCALAR:
            return self.uint(_GGUF_SCALAR[kind])
        if kind == _GGUF_STRING:
            self.skip(self.uint(8))
        elif kind == _GGUF_ARRAY:
            item, count = self.uint(4), self.uint(8)
            if item in _GGUF_SCALAR:
                self.skip(_GGUF_SCALAR[item] * count)
            elif item in (_GGUF_STRING, _GGUF_ARRAY):
                for _ in range(count):
                    self.value(item)
            else:
                raise _Bad(f"unknown value type {item} at byte {self.pos - 12}")
        else:
            raise _Bad(f"unknown value type {kind} at byte {self.pos - 4}")
        return None


def _ggml_sizes() -> dict:
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # transformers needs the gguf package to read the file anyway
        return {}
    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def _gguf_expected_size(buf) -> int:
    """The size the GGUF header in `buf` says the file has (raises _Cut / _Bad)."""
    cur = _Cursor(buf)
    cur.skip(8)  # magic and version, checked by check_gguf
    n_tensors, n_values = cur.uint(8), cur.uint(8)
    alignment = 32
    for _ in range(n_values):
        key = cur.string()
        value = cur.value(cur.uint(4))
        if key == b"general.alignment" and value:
            alignment = value
    sizes, end = _ggml_sizes(), 0
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.uint(4)
        if n_dims > 8:
            raise _Bad(f"tensor {name[:60].decode('utf-8', 'replace')!r} has {n_dims} dimensions")
        numel = 1
        for _ in range(n_dims):
            numel *= cur.uint(8)
        kind, offset = cur.uint(4), cur.uint(8)
        if kind in sizes:
            block, nbytes = sizes[kind]
            end = max(end, offset + numel // block * nbytes)
    data_start = -(-cur.pos // alignment) * alignment
    return data_start + end if n_tensors else cur.pos


def check_gguf(path: str | Path, what: str = "model file",
               error: type[TuneforgeError] = ModelError) -> None:
    """Walk a .gguf file's header (no tensor is read) and compare it with the file's size.

    Raises `error` (one line naming the file) when it is missing, empty, not GGUF (no 'GGUF'
    magic), of a GGUF version tuneforge cannot read, has a malformed header, or is truncated.
    """
    path = Path(path)
    size = _stat_size(path, what, error)
    where = f"{what} '{path}'"
    if size == 0:
        raise error(f"{where} is empty; {_AGAIN}")
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            head = bytes(buf[:32])
            if not head.startswith(b"GGUF"):
                raise error(f"{where} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'"
                            f"{_looks_like(head)}); give a .gguf file or a Hugging Face model folder")
            version = int.from_bytes(head[4:8], "little") if len(head) >= 8 else None
            if version is not None and version not in (2, 3):
                raise error(f"{where} is GGUF version {version}, which tuneforge cannot read (it reads "
                            "versions 2 and 3); convert the model again with a current llama.cpp")
            expected = _gguf_expected_size(buf)
    except OSError as exc:
        raise error(f"{what} {describe_os_error(exc, 'read')}") from None
    except _Cut:
        raise error(f"{where} is truncated: the file ({size} bytes) ends inside its GGUF header; "
                    f"{_AGAIN}") from None
    except _Bad as exc:
        raise error(f"{where} has a damaged GGUF header ({exc}); {_AGAIN}") from None
    except RecursionError:
        raise error(f"{where} has a damaged GGUF header (arrays nested too deeply); {_AGAIN}") from None
    if size < expected:
        raise error(f"{where} is truncated: its header says {expected} bytes but the file has {size}; "
                    f"{_AGAIN}")


_DTYPE_KEYS = ("dtype", "torch_dtype")
# sizes a model cannot have below 1; transformers accepts some (num_hidden_layers -1 builds a model
# with no layers) and fails on others deep inside (ZeroDivisionError for num_attention_heads 0)
_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head",
              "n_positions", "d_model")


def _check_values(config: dict, config_file: Path, depth: int = 0) -> None:
    """Every dtype / torch_dtype in config.json (and its sub-configs) names a torch dtype (else
    transformers fails with an AttributeError), and every size that is a number is at least 1."""
    import torch

    for key, value in config.items():
        if key in _DTYPE_KEYS and value is not None:
            if not isinstance(value, str) or not isinstance(getattr(torch, value, None), torch.dtype):
                shown = repr(value) if isinstance(value, str) else json.dumps(value)
                raise ModelError(f"model config {quoted(config_file)}: {key} {shown} is not a torch dtype; "
                                 "use float32, bfloat16 or float16 (or remove the key)")
        elif key in _SIZE_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            raise ModelError(f"model config {quoted(config_file)}: {key} must be at least 1, got {value}; "
                             "fix config.json (or copy the model again)")
        elif isinstance(value, dict) and depth < 4:
            _check_values(value, config_file, depth + 1)


def load_model_config(directory: Path, trust_remote_code: bool = False, config_name: str = "config.json"):
    """transformers' `AutoConfig` of a model folder. Raises ModelError (one line naming
    config.json) when it is missing, not a JSON object, names a dtype torch lacks or a size
    below 1, or is not usable by transformers (no model_type, a value of the wrong type, values
    it cannot work with)."""
    import transformers

    config_file = Path(directory) / config_name  # another name: a file no HF loader takes for a model's
    if not config_file.exists():
        raise ModelError(f"'{directory}' has no {config_name}")
    config = read_json(config_file, "model config", ModelError)
    if not isinstance(config, dict):
        raise ModelError(f"model config '{config_file}' must hold a JSON object; save the model again")
    _check_values(config, config_file)
    # what the config classes raise for values they cannot use (e.g. ZeroDivisionError for
    # num_attention_heads 0); the cause stays attached for --debug
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError, KeyError, AttributeError,
                                               ArithmeticError, AssertionError)
    try:
        from huggingface_hub.errors import StrictDataclassError  # a value of the wrong type

        errors += (StrictDataclassError,)
    except ImportError:
        pass
    try:
        source = directory if config_name == "config.json" else config_file
        return transformers.AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except errors as exc:
        raise ModelError(f"model config '{config_file}' is not usable: {one_line(exc)}") from exc
