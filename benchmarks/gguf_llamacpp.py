"""Does llama.cpp itself run tuneforge's GGUF export as transformers runs the merged model?

    pip install llama-cpp-python          # builds llama.cpp (about 15 min on 2 cores)
    python benchmarks/gguf_llamacpp.py --adapter saves/demo-identity
    python benchmarks/gguf_llamacpp.py --quants f16 --prompts 4 --max-new-tokens 16   # quicker

The peer is the merged model in transformers (float32). For each export_quantization the
script writes the GGUF with `tuneforge export` (export_format gguf), loads it in llama.cpp
(llama-cpp-python) and reports, over chat prompts from the identity and alpaca demo data:

- tokens: llama.cpp's tokenization of each rendered prompt equals the HF tokenizer's (count);
- logits at the last prompt position: max |difference| and top-1 agreement;
- greedy answers from the same prompt ids: identical answers, and the mean share of the
  answer that matches before the first different token;
- chat template: llama.cpp's `create_chat_completion`, which renders the chat template stored in
  the GGUF, gives the same greedy answer as transformers' chat template.

For q8_0/q4_0 a second row quantizes tuneforge's f16 file with llama.cpp's own quantizer (as
`llama-quantize` does): tuneforge's quantized file should be as close to the peer as that one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[list[dict]]:
    """Identity questions first (what the demo adapter learned), then alpaca instructions."""
    identity = json.loads((ROOT / "tuneforge/resources/data/identity.json").read_text())
    questions = [r["instruction"] for r in identity[: (n + 1) // 2]]
    alpaca = ROOT.parent / "shared/data/alpaca_en_demo.json"
    if alpaca.is_file():
        questions += [r["instruction"] + ("\n" + r["input"] if r["input"] else "")
                      for r in json.loads(alpaca.read_text())[: n - len(questions)]]
    placeholders = {"{{name}}": "Ember", "{{author}}": "the Tuneforge Guild"}
    out = []
    for q in questions[:n]:
        for k, v in placeholders.items():
            q = q.replace(k, v)
        out.append([{"role": "user", "content": q}])
    return out


def hf_reference(cfg, chats, max_new_tokens):
    """Merged float32 model in transformers: prompt ids, last-position logits, greedy answer ids."""
    from tuneforge.infer import ChatModel
    from tuneforge.infer.generation import chat_input_ids

    chat = ChatModel(cfg)
    tok = chat.tokenizer
    eos = tok.eos_token_id
    rows = []
    for messages in chats:
        ids = chat_input_ids(tok, messages)
        with torch.inference_mode():
            logits = chat.model(ids).logits[0, -1].float().numpy()
            out = chat.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                      eos_token_id=eos, temperature=None, top_p=None, top_k=None)
        answer = out[0, ids.shape[1]:].tolist()
        rows.append({"ids": ids[0].tolist(), "logits": logits, "answer": answer,
                     "text": tok.decode(answer, skip_special_tokens=True),
                     "rendered": tok.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=True)})
    return rows, eos


def llama_greedy(llm, ids: list[int], max_new_tokens: int, eos: int) -> tuple[list[int], np.ndarray]:
    llm.reset()
    llm.eval(ids)
    last = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    answer = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        answer.append(tok)
        if tok == eos or len(answer) >= max_new_tokens:
            break
    return answer, last


def agreement(a: list[int], b: list[int]) -> float:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), 1)


def llama_quantize(f16: Path, quant: str, tmp: Path) -> Path:
    """llama.cpp's own quantizer, with tuneforge's choices: norms stay f32 (llama.cpp's rule too)
    and, for q4_0, the (tied) embedding in q8_0."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[quant]
    params.nthread = 2
    if quant == "q4_0":
        params.token_embedding_type = params.output_tensor_type = 8  # GGML_TYPE_Q8_0
    out = tmp / f"llama-{quant}.gguf"
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f16} to {quant}")
    return out


def report(label: str, path: Path, chats, ref, eos: int, args) -> None:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=1024, n_threads=args.threads, logits_all=True, verbose=False)
    same_tokens = same_answers = same_chat = top1 = 0
    max_diff, prefix = 0.0, []
    for messages, r in zip(chats, ref):
        llama_ids = llm.tokenize(r["rendered"].encode(), add_bos=False, special=True)
        same_tokens += llama_ids == r["ids"]
        answer, last = llama_greedy(llm, r["ids"], args.max_new_tokens, eos)
        max_diff = max(max_diff, float(np.abs(last - r["logits"]).max()))
        top1 += int(last.argmax() == r["logits"].argmax())
        same_answers += answer == r["answer"]
        prefix.append(agreement(r["answer"], answer))
        reply = llm.create_chat_completion(messages, temperature=0.0, top_k=1,
                                           max_tokens=args.max_new_tokens, repeat_penalty=1.0)
        same_chat += reply["choices"][0]["message"]["content"].strip() == r["text"].strip()
    n = len(chats)
    print(f"| {label} | {path.stat().st_size / 2**20:.0f} | {same_tokens}/{n} | {max_diff:.3f} | "
          f"{top1}/{n} | {same_answers}/{n} | {100 * sum(prefix) / n:.0f} % | {same_chat}/{n} |",
          flush=True)
    llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", help="LoRA adapter folder merged before export (default: none)")
    ap.add_argument("--quants", default="f16,q8_0,q4_0")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")

    from tuneforge.config import load_config
    from tuneforge.workflows import export

    values = {"do_sample": False, "infer_dtype": "float32", "template": None}
    if args.adapter:
        values["adapter_name_or_path"] = args.adapter
    chats = prompts(args.prompts)
    ref, eos = hf_reference(load_config(None, values), chats, args.max_new_tokens)
    print(f"llama.cpp via llama-cpp-python {llama_cpp.__version__}; peer: transformers, merged "
          f"model in float32; {len(chats)} prompts, {args.max_new_tokens} new tokens, greedy\n")
    header = ("file", "MB", "tokens =", "max|dlogit|", "top-1", "answers =", "prefix", "chat API =")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        f16 = None
        for quant in args.quants.split(","):
            out = Path(tmp) / quant
            export(load_config(None, {**values, "export_dir": str(out), "export_format": "gguf",
                                      "export_quantization": quant}))
            path = next(out.glob("*.gguf"))
            f16 = path if quant == "f16" else f16
            report(f"tuneforge {quant}", path, chats, ref, eos, args)
            if quant != "f16" and f16 is not None:  # the peer: llama.cpp's quantizer on our f16 file
                report(f"llama.cpp quantize {quant}", llama_quantize(f16, quant, Path(tmp)),
                       chats, ref, eos, args)
    print("\nfirst prompt:", chats[0][0]["content"])
    print("transformers:", ref[0]["text"])


if __name__ == "__main__":
    main()
