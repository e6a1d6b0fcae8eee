"""The in-place key/value cache holds exactly what transformers' growing one holds, and never allocates again."""

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from quant_pipeline.evaluation.kv_cache import PreallocatedLayer, decode_cache


def _states(rows: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, positions, 8, generator=g), torch.randn(rows, 3, positions, 8, generator=g)


def test_updates_and_rows_leaving_give_the_same_keys_and_values_as_the_growing_cache_without_new_buffers():
    grown, written = DynamicLayer(), PreallocatedLayer(capacity=9)
    steps = [(5, 5, None), (5, 1, [0, 2, 3, 4]), (4, 1, None), (4, 1, [1, 3]), (2, 1, [1])]
    buffers = None
    for seed, (rows, positions, keep) in enumerate(steps):
        if keep is not None:
            for layer in (grown, written):
                layer.batch_select_indices(torch.tensor(keep))
            rows = len(keep)
        keys, values = _states(rows, positions, seed)
        expected = grown.update(keys, values)
        got = written.update(keys, values)
        buffers = buffers or (written._key_buffer.data_ptr(), written._value_buffer.data_ptr())
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True)), seed
        assert written.get_seq_length() == grown.get_seq_length()
    assert buffers == (written._key_buffer.data_ptr(), written._value_buffer.data_ptr())
    assert written.keys.shape == (1, 3, 9, 8)


def test_a_position_past_the_capacity_is_refused_and_rows_must_stay_in_order():
    layer = PreallocatedLayer(capacity=4)
    layer.update(*_states(2, 4, 0))
    with pytest.raises(ValueError, match="4 positions cannot take position 5"):
        layer.update(*_states(2, 1, 1))
    with pytest.raises(ValueError, match="ascending"):
        layer.batch_select_indices(torch.tensor([1, 0]))


def test_full_attention_layers_are_preallocated_and_sliding_window_layers_stay_transformers_own():
    llama = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    assert [type(x) for x in decode_cache(type("M", (), {"config": llama})(), 16).layers] == [PreallocatedLayer] * 2
    gemma = Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        head_dim=8, sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    kinds = [type(x) for x in decode_cache(type("M", (), {"config": gemma})(), 16).layers]
    assert kinds == [DynamicSlidingWindowLayer, DynamicSlidingWindowLayer, PreallocatedLayer]
