"""Fused Llama modules against the plain transformers modules, and the module options that use them."""

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from lit_tune.data import SFTDataModule
from lit_tune.models import build_tiny_tokenizer, export_hf, tiny_llama_config
from lit_tune.models.compile_layers import compile_decoder_layers, find_cxx_compiler
from lit_tune.models.fused import FusedSwiGLUMLP, fuse_llama_modules
from lit_tune.modules import SFTModule
from tests.conftest import cpu_trainer

# SmolLM2-135M's layer shape (hidden 576, intermediate 1536, 9 heads, 3 key-value heads, tied
# embeddings) with two layers and a small vocabulary, randomly initialised.
_SMOLLM2_SHAPED = LlamaConfig(
    vocab_size=512,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=2,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)


def _model_pair(config: LlamaConfig) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    fused = copy.deepcopy(plain)
    assert fuse_llama_modules(fused) == config.num_hidden_layers
    return plain.train(), fused.train()


def _loss_and_grads(model: LlamaForCausalLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    logits = model(input_ids=input_ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("config", [tiny_llama_config(320), _SMOLLM2_SHAPED], ids=["tiny", "smollm2_shaped"])
def test_fused_loss_and_grads_match_plain(config):
    plain, fused = _model_pair(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 64))
    loss, grads = _loss_and_grads(plain, input_ids)
    fused_loss, fused_grads = _loss_and_grads(fused, input_ids)

    torch.testing.assert_close(fused_loss, loss, atol=1e-5, rtol=0)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_fused_state_dict_and_export_unchanged(tmp_path):
    plain, fused = _model_pair(tiny_llama_config(320))
    plain_state, fused_state = plain.state_dict(), fused.state_dict()
    assert list(fused_state) == list(plain_state)
    for key, value in plain_state.items():
        assert torch.equal(fused_state[key], value), key

    export_hf(fused, build_tiny_tokenizer(), tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(reloaded.model.layers[0].mlp) is LlamaMLP
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == plain_state.keys()
    for key, value in plain_state.items():
        assert torch.equal(reloaded_state[key], value), key


def _saved_bytes(model: LlamaForCausalLM, input_ids: torch.Tensor) -> int:
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, use_cache=False).logits.sum().backward()
    return sum(storages.values())


def test_fused_saves_one_activation_less_per_layer():
    config = tiny_llama_config(320)
    plain, fused = _model_pair(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 64))
    saved_plain = _saved_bytes(plain, input_ids)
    saved_fused = _saved_bytes(fused, input_ids)
    # silu(gate) is no longer kept: [batch * seq_len, intermediate] fp32 values per layer.
    activation = input_ids.numel() * config.intermediate_size * 4
    assert saved_plain - saved_fused == config.num_hidden_layers * activation


def test_fused_mlp_runs_plain_forward_for_bf16():
    plain, fused = _model_pair(tiny_llama_config(320))
    x = torch.randn(2, 8, 256, dtype=torch.bfloat16)
    plain_mlp = plain.model.layers[0].mlp.to(torch.bfloat16)
    fused_mlp = fused.model.layers[0].mlp.to(torch.bfloat16)
    assert torch.equal(fused_mlp(x), plain_mlp(x))


def test_fuse_leaves_subclasses_and_fused_modules():
    class CustomMLP(LlamaMLP):
        pass

    config = tiny_llama_config(320)
    model = AutoModelForCausalLM.from_config(config)
    model.model.layers[0].mlp.__class__ = CustomMLP
    assert fuse_llama_modules(model) == config.num_hidden_layers - 1
    assert type(model.model.layers[0].mlp) is CustomMLP
    assert fuse_llama_modules(model) == 0  # already fused


def _fit_sft(steps: int, **kwargs) -> tuple[SFTModule, list[float]]:
    torch.manual_seed(0)
    module = SFTModule(
        model="tiny",
        export=False,
        # SGD, because Adam's division by sqrt(v) turns 1e-7 gradient differences on
        # near-zero gradients into update differences as large as the learning rate.
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        **kwargs,
    )
    losses = []
    module.on_train_batch_end = lambda outputs, batch, batch_idx: losses.append(float(outputs["loss"]))
    # Rows of one length, so that every batch has one shape and a compiled layer compiles once.
    rows = [{"prompt": f"question {i}", "response": f"answer {i} " * 4} for i in range(8)]
    data = SFTDataModule(rows=rows, batch_size=2, val_fraction=0.0, seed=0)
    cpu_trainer(max_steps=steps).fit(module, datamodule=data)
    return module, losses


def test_sft_fused_option_trains_like_plain():
    fused, fused_losses = _fit_sft(3)
    plain, plain_losses = _fit_sft(3, fused_modules=False)
    assert all(type(layer.mlp) is FusedSwiGLUMLP for layer in fused.model.model.layers)
    assert all(type(layer.mlp) is LlamaMLP for layer in plain.model.model.layers)
    assert len(fused_losses) == 3
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(plain_losses), atol=1e-5, rtol=0)
    plain_state = plain.model.state_dict()
    for key, value in fused.model.state_dict().items():
        torch.testing.assert_close(value, plain_state[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.skipif(find_cxx_compiler() is None, reason="TorchInductor needs a C++ compiler on PATH")
def test_sft_compile_option_trains_like_plain():
    compiled, compiled_losses = _fit_sft(2, compile=True)
    _, plain_losses = _fit_sft(2)
    assert hasattr(compiled.model.model.layers[0], "_compiled_call_impl")
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(plain_losses), atol=1e-4, rtol=0)


def test_compile_rejected_under_model_parallel():
    model = AutoModelForCausalLM.from_config(tiny_llama_config(320))
    with pytest.raises(ValueError, match=r"compile=True is not supported under ModelParallelStrategy"):
        compile_decoder_layers(model, ModelParallelStrategy())


def test_compile_without_cxx_compiler_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(320))
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        compile_decoder_layers(model)


def test_compile_without_decoder_layers_raises():
    with pytest.raises(ValueError, match="found no decoder layer"):
        compile_decoder_layers(torch.nn.Linear(2, 2))
