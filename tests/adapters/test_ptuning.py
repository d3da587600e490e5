"""P-tuning against peft's PromptEncoderConfig (tiny Llama, Qwen2, GPT-2), MLP and LSTM prompt
encoders: outputs, gradients, generation, files both ways (the encoder's output is saved), no
merge (test_prompt.assert_matches_peft)."""

from __future__ import annotations

import pytest
from peft import PromptEncoderConfig as PeftPromptEncoderConfig
from test_prompt import KINDS, assert_matches_peft

from tuneforge.adapters import PromptEncoderConfig
from tuneforge.errors import ConfigError

WHY = "P-tuning adds virtual tokens before the input, which no weight can hold"


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("kind", KINDS)
def test_ptuning_matches_peft(tmp_path, kind, encoder):
    kw = dict(num_virtual_tokens=4, encoder_reparameterization_type=encoder, encoder_hidden_size=16)
    assert_matches_peft(tmp_path, kind, PromptEncoderConfig(**kw),
                        PeftPromptEncoderConfig(task_type="CAUSAL_LM", **kw), WHY)


def test_ptuning_config_errors():
    with pytest.raises(ConfigError, match="encoder_reparameterization_type must be MLP or LSTM"):
        PromptEncoderConfig(encoder_reparameterization_type="gru")
    with pytest.raises(ConfigError, match="encoder_dropout must be in"):
        PromptEncoderConfig(encoder_dropout=1.5)


def test_only_decoder_language_models():
    from test_matrix import build

    from tuneforge.adapters import add_adapter, list_adapters

    bert = build("bert")
    with pytest.raises(ConfigError, match="need a decoder-only language model"):
        add_adapter(bert, PromptEncoderConfig())
    assert list_adapters(bert) == {} and not bert._forward_pre_hooks
