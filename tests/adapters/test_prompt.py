"""Prompt tuning against peft's PromptTuningConfig (tiny Llama, Qwen2, GPT-2), and the virtual-token
machinery every prompt / prefix method shares (virtual_tokens.py, virtual_forward.py).

`assert_matches_peft` is the oracle test_prefix.py and test_ptuning.py use too:
1. same weights -> same logits on the real tokens (also with a padded batch) and same gradients;
2. greedy generation: every new token is the argmax of peft's logits for the sequence so far
   (peft 0.21's own generate() loses the virtual tokens' positions after the first step with
   transformers 5, so its forward, not its generate, is the reference);
3. tuneforge saves -> peft loads -> same logits; peft saves -> tuneforge loads -> same logits;
4. merge is refused with the method's reason; disable_adapters gives the base model; deleting the
   adapter gives back the plain model.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import PromptTuningConfig as PeftPromptTuningConfig
from test_matrix import build

from tuneforge.adapters import (
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge_adapters,
    route_adapters,
    save_adapter,
    set_active_adapters,
    unload,
)
from tuneforge.adapters.virtual_tokens import HOLDER, virtual_mask
from tuneforge.errors import ConfigError

TOL = 1e-5
KINDS = ["llama", "qwen2", "gpt2"]
OURS, THEIRS = f"{HOLDER}.encoders.default.", "prompt_encoder.default."


def ids_and_mask(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as the training collator pads
    return ids, mask


def pair(kind: str, ours_cfg, peft_cfg):
    """(ours, peft) on the same base, with the same random (not initial) adapter weights."""
    ours = add_adapter(build(kind), ours_cfg)
    theirs = get_peft_model(build(kind), peft_cfg)
    mine = {n.removeprefix(OURS): p for n, p in ours.named_parameters() if p.requires_grad}
    their = {n.removeprefix(THEIRS): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == their.keys()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            their[n].copy_(p)
    return ours.eval(), theirs.eval(), mine, their


def real(logits: torch.Tensor, t: int) -> torch.Tensor:
    return logits[:, -t:]


def assert_matches_peft(tmp_path, kind: str, ours_cfg, peft_cfg, why: str) -> None:
    ours, theirs, mine, their = pair(kind, ours_cfg, peft_cfg)
    ids, mask = ids_and_mask()
    t = ids.shape[1]
    base = build(kind).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        assert got.shape == base_logits.shape  # the virtual tokens stay inside the model
        assert not torch.allclose(got, base_logits, atol=1e-3)
        torch.testing.assert_close(got, real(theirs(input_ids=ids).logits, t), atol=TOL, rtol=TOL)
        padded = ours(input_ids=ids, attention_mask=mask).logits
        expect = real(theirs(input_ids=ids, attention_mask=mask).logits, t)
        torch.testing.assert_close(padded[mask.bool()], expect[mask.bool()], atol=TOL, rtol=TOL)

    # gradients (train mode, labels through the model's own loss)
    ours.train(), theirs.train()
    labels = ids.masked_fill(mask == 0, -100)
    la = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    lb = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(la, lb, atol=TOL, rtol=TOL)
    la.backward(), lb.backward()
    for n, p in mine.items():
        torch.testing.assert_close(p.grad, their[n].grad, atol=TOL, rtol=1e-4, msg=n)
    ours.eval(), theirs.eval()

    # greedy generation: each new token is peft's argmax for the sequence before it
    with torch.no_grad():
        out = ours.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False)
        ref = real(theirs(input_ids=out).logits, out.shape[1]).argmax(-1)
    assert out.shape[1] > t  # (gpt2's eos is token 0: it may stop early)
    assert out[0, t:].tolist() == ref[0, t - 1:-1].tolist()

    # tuneforge save -> peft load; peft save -> tuneforge load
    save_adapter(ours, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(real(loaded(input_ids=ids).logits, t), got, atol=TOL, rtol=TOL)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(build(kind), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, got, atol=TOL, rtol=TOL)

    # no merge; disable -> base; delete -> the plain model again
    with pytest.raises(ConfigError, match=why):
        merge_adapters(ours)
    with torch.no_grad(), disable_adapters(ours):
        torch.testing.assert_close(ours(input_ids=ids).logits, base_logits)
    delete_adapter(ours, "default")
    assert set(ours.state_dict()) == set(base.state_dict())
    assert not ours._forward_pre_hooks and not ours._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, base_logits)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_tuning_matches_peft(tmp_path, kind):
    assert_matches_peft(
        tmp_path, kind, PromptTuningConfig(num_virtual_tokens=5),
        PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prompt tuning adds virtual tokens before the input, which no weight can hold",
    )


def test_prompt_text_init_is_the_texts_embeddings(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Answer briefly"
    cfg = PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="text", prompt_tuning_init_text=text)
    add_adapter(model, cfg)
    ids = tok(text)["input_ids"]
    want = (ids * 7)[:7]  # repeated, then cut to num_virtual_tokens (peft's rule)
    prompt = getattr(model, HOLDER).encoders["default"].embedding.weight
    torch.testing.assert_close(prompt, model.get_input_embeddings()(torch.tensor(want)).float())


def test_prompt_config_errors():
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="text")
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive integer"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="prompt_tuning_init must be one of"):
        PromptTuningConfig(prompt_tuning_init="vocab")


def alone(model, name: str, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits of one unpadded sequence with adapter `name`."""
    with torch.no_grad(), route_adapters(model, [name]):
        return model(input_ids=ids[None]).logits[0, -1]


def test_mixed_batch_routes_each_row_exactly():
    """One batch, left-padded, rows for a prompt, a prefix, a LoRA adapter and the base: each row's
    logits equal that row run alone; the same with the mask over the virtual block (virtual_mask)."""
    model = build("llama")
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=3), "p")
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=5), "x")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "l")
    model.eval()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (6, 9, 4, 7)]
    names = ["p", "x", "l", "__base__"]
    width = 9
    ids = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expect = torch.stack([alone(model, n, s) for n, s in zip(names, seqs)])
    with torch.no_grad(), route_adapters(model, names):
        got = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    vm = virtual_mask(model, names)
    assert vm.tolist() == [[0] * 5 + [1] * 3, [1] * 5 + [0] * 3, [0] * 8, [0] * 8]
    whole = torch.cat([vm, mask], dim=1)
    with torch.no_grad(), route_adapters(model, names):
        out = model(input_ids=ids, attention_mask=whole,
                    position_ids=(whole.cumsum(-1) - 1).clamp(min=0)[:, -width:], use_cache=True)
        # one decoding step on that cache, the mask covering it
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        whole2 = torch.cat([whole, torch.ones(4, 1, dtype=torch.long)], dim=1)
        step = model(input_ids=nxt, attention_mask=whole2, position_ids=whole2.sum(-1, keepdim=True) - 1,
                     cache=out.cache).logits[:, -1]
    torch.testing.assert_close(out.logits[:, -1], expect, atol=1e-5, rtol=1e-5)
    step_alone = torch.stack([alone(model, n, torch.cat([s, t])) for n, s, t in zip(names, seqs, nxt)])
    torch.testing.assert_close(step, step_alone, atol=1e-5, rtol=1e-5)


def test_refusals():
    model = add_adapter(build("llama"), PromptTuningConfig(num_virtual_tokens=2), "p")
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=2), "x")
    ids = torch.randint(0, 256, (1, 6))
    with pytest.raises(ConfigError, match="pad the batch instead"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    set_active_adapters(model, ["p", "x"])
    with pytest.raises(ConfigError, match="activate one of them at a time"):
        model(input_ids=ids)
    with pytest.raises(ConfigError, match="no weight can hold"):
        unload(model, merge=True)
    plain = unload(model, merge=False)
    assert HOLDER not in dict(plain.named_modules()) and not plain._forward_pre_hooks


def test_generate_left_padded_batch_and_deep_copy():
    """generate() on a left-padded batch gives each row its answer alone (prompt and prefix), and a
    deep copy of the model runs its own adapters."""
    import copy

    for cfg in (PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=4)):
        model = add_adapter(build("llama"), cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(3)
        g = torch.Generator().manual_seed(11)
        a, b = torch.randint(1, 256, (7,), generator=g), torch.randint(1, 256, (4,), generator=g)
        ids = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
        mask = (torch.arange(7) >= torch.tensor([[0], [3]])).long()
        kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            both = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, 7:]
            one = [model.generate(input_ids=s[None], **kw)[0, len(s):] for s in (a, b)]
            twin = copy.deepcopy(model)
            with disable_adapters(model):  # the copy's adapter is its own
                assert torch.equal(twin.generate(input_ids=a[None], **kw)[0, 7:], one[0])
        assert both.tolist() == [t.tolist() for t in one]


def test_logits_to_keep_and_hidden_states_are_the_real_tokens():
    """The training loop's sparse loss asks for some positions' logits (logits_to_keep); hidden
    states come back for the real tokens too."""
    model = add_adapter(build("llama"), PromptTuningConfig(num_virtual_tokens=3)).eval()
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)
        some = model(input_ids=ids, logits_to_keep=torch.tensor([1, 4, 7])).logits
        last = model(input_ids=ids, logits_to_keep=1).logits
    torch.testing.assert_close(some, full.logits[:, [1, 4, 7]])
    torch.testing.assert_close(last, full.logits[:, -1:])
    assert all(h.shape[1] == 8 for h in full.hidden_states)
