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

    python benchmarks/gguf_llamacpp.py --architectures

instead checks every architecture the exporter writes (small random models with the default
tokenizer: Llama with default, linear and llama3 rope scaling, Mistral, Qwen2 with its q/k/v
biases, Qwen3 with q/k norms and a head size apart from hidden/heads): logits of transformers
(matrices rounded to f16, as in the file) against llama.cpp at every position of a 300-token text,
so rope scaling beyond the original context is covered.
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


def tiny_models():
    """(label, model) pairs: random weights, the default model's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    setups = [
        ("llama", "llama", {}),
        ("llama, linear rope x4", "llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
        ("llama, llama3 rope x8", "llama", {"rope_scaling": llama3}),
        ("mistral", "mistral", {"sliding_window": None}),
        ("qwen2 (q/k/v biases)", "qwen2", {}),
        ("qwen3 (q/k norms, head_dim 64)", "qwen3", {"head_dim": 64}),
    ]
    for label, kind, extra in setups:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **common, **extra))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)  # zero-initialised biases would prove nothing
                elif "norm" in name:
                    p.uniform_(0.5, 1.5)
        yield label, model.float().eval()


def check_architectures(args) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from tuneforge.export.gguf import write_gguf
    from tuneforge.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    text = " ".join(r["output"] for r in json.loads((ROOT.parent / "shared/data/alpaca_en_demo.json")
                                                    .read_text())[:20])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:300]
    print("| model | positions | max|dlogit| | max|logit| | top-1 agree |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in tiny_models():
            path = write_gguf(model, tokenizer, Path(tmp) / "m.gguf", "f16")
            with torch.no_grad():  # as the file holds them: matrices f16, norms and biases f32
                for p in model.parameters():
                    if p.ndim >= 2:
                        p.copy_(p.half().float())
            reference = model
            with torch.inference_mode():
                want = reference(torch.tensor([ids])).logits[0].numpy()
            llm = Llama(str(path), n_ctx=1024, n_threads=args.threads, logits_all=True, verbose=False)
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)], dtype=np.float32)
            llm.close()
            agree = float((got.argmax(-1) == want.argmax(-1)).mean())
            print(f"| {label} | {len(ids)} | {np.abs(got - want).max():.4f} | {np.abs(want).max():.2f} "
                  f"| {100 * agree:.1f} % |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", help="LoRA adapter folder merged before export (default: none)")
    ap.add_argument("--quants", default="f16,q8_0,q4_0")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--architectures", action="store_true",
                    help="check each architecture the exporter writes on small random models")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")
    if args.architectures:
        return check_architectures(args)

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
