"""OLMo 2 and OLMo 3 for onnxruntime-genai 0.18's model builder, which knows OLMo 1 only.

Their layers differ from the builder's pre-norm decoder in three ways, each written here with the
builder's own node makers:

- norms after each block, none before: ``h = x + norm(attn(x))``, ``out = h + norm(mlp(h))``, so attention
  and the MLP read the residual stream itself (plain ``Add`` nodes carry it; the final norm is the
  builder's, a skip norm over the last residual and MLP output);
- query and key norms over the whole projection (``num_heads * head_dim`` weights), not per head;
- OLMo 3: sliding-window layers (the builder's ``layer_types`` handling) whose RoPE is plain, beside full
  layers whose RoPE carries the config's scaling (YaRN on OLMo-3-7B): one cos/sin cache each, as for
  Gemma 3.

The classes subclass the builder's at run time (``olmo2_model(builder)``); capture_onnx hands an
OLMo 2 / 3 config to the builder as an OLMo one and this class builds it (``_builder_adapted``). Proven
against PyTorch by the tiny models in tests/tasks/test_families.py.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OLMO2_TYPES", "olmo2_model", "split_rope_caches"]

OLMO2_TYPES = ("olmo2", "olmo3")


def split_rope_caches(model: Any, make_caches: Any) -> None:
    """A builder model's two cos/sin caches, named as Gemma 3's builder names them: the full ("global")
    layers' with the config's scaling (linear, YaRN and its magnitude), then the sliding ("local") layers'
    plain, at their own theta (``model.rope_local_theta``). ``make_caches`` is the builder's own cache maker
    (the class's parent's, not an override that picks a cache by layer)."""
    model.cos_cache_global_name, model.sin_cache_global_name = "cos_cache_global", "sin_cache_global"
    make_caches(cos_cache_name=model.cos_cache_global_name, sin_cache_name=model.sin_cache_global_name)
    model.rope_attrs.pop("rescale_inv_freq", None)
    model.rope_attrs.update(create_caches=True, theta=model.rope_local_theta, rescale_factors=1, mscale=1)
    model.cos_cache_local_name, model.sin_cache_local_name = "cos_cache_local", "sin_cache_local"
    make_caches(cos_cache_name=model.cos_cache_local_name, sin_cache_name=model.sin_cache_local_name)


def olmo2_model(builder: Any) -> type:
    """The OLMo 2 / 3 builder class, a subclass of this builder module's ``Model``."""

    class Olmo2Model(builder.Model):
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            self.attention_attrs["q_norm"] = True
            self.attention_attrs["k_norm"] = True
            self.rope_local_theta = getattr(config, "rope_local_base_freq", None)
            if self.rope_local_theta is not None:
                self.make_rotary_embedding_multi_cache()

        # -- RoPE: a scaled cache for the full layers, a plain one for the sliding layers -----------------
        def make_rotary_embedding_multi_cache(self) -> None:
            split_rope_caches(self, super().make_rotary_embedding_caches)

        def make_rotary_embedding_caches(self, **kwargs: Any) -> Any:
            if getattr(self, "rope_local_theta", None) is not None and "cos_cache_name" not in kwargs:
                local = self.window_size not in (None, -1)
                kwargs = {"cos_cache_name": self.cos_cache_local_name if local else self.cos_cache_global_name,
                          "sin_cache_name": self.sin_cache_local_name if local else self.sin_cache_global_name}
            return super().make_rotary_embedding_caches(**kwargs)

        # -- query and key norms over the whole projection -------------------------------------------------
        def make_qk_norm(self, layer_id: int, attention: Any) -> None:
            for which, module, size in (("q", attention.q_norm, self.q_size), ("k", attention.k_norm, self.kv_size)):
                name = f"/model/layers.{layer_id}/attn/{which}_norm/SimplifiedLayerNormalization"
                weight = f"model.layers.{layer_id}.attn.{which}_norm.layernorm.weight"
                self.make_initializer(module.weight, weight, to=self.io_dtype)
                self.make_node("SimplifiedLayerNormalization", inputs=[self.attention_attrs[f"{which}_path"], weight],
                               outputs=[f"{name}/output_0"], name=name, epsilon=self.layernorm_attrs["epsilon"],
                               axis=-1, stash_type=1)
                self.make_value(f"{name}/output_0", self.io_dtype, shape=["batch_size", "sequence_length", size])
                self.attention_attrs[f"{which}_path"] = f"{name}/output_0"

        # -- norms after each block ------------------------------------------------------------------------
        def _residual(self, layer_id: int, where: str, branch: str) -> str:
            """root_input + ``branch`` (a normalized block output): the residual stream after it."""
            name = f"/model/layers.{layer_id}/{where}_residual/Add"
            self.make_add(name, [self.layernorm_attrs["root_input"], branch], self.io_dtype,
                          self.make_hidden_state_shape())
            self.layernorm_attrs["root_input"] = f"{name}/output_0"
            return f"{name}/output_0"

        def _post_norm(self, layer_id: int, norm: Any, location: str) -> str:
            """The block output (skip_input) normalized on its own; the residual stream is left as it is."""
            attrs = self.layernorm_attrs
            residual = attrs["root_input"]
            attrs["root_input"] = attrs["skip_input"]
            self.make_layernorm(layer_id, norm, skip=False, simple=True, location=location)
            attrs["root_input"] = residual
            attrs["skip_input"] = attrs["output_0"]
            return str(attrs["output_0"])

        def make_layer(self, layer_id: int, layer: Any) -> None:
            attrs = self.layernorm_attrs
            if not attrs["first_layernorm"]:  # the last layer's residual plus its normalized MLP output
                self._residual(layer_id, "input", attrs["skip_input"])
            self.make_attention(layer_id, layer.self_attn, root_input=attrs["root_input"])
            stream = self._residual(layer_id, "attention",
                                    self._post_norm(layer_id, layer.post_attention_layernorm, "post_attention"))
            self.make_mlp(layer_id, layer.mlp, root_input=stream)
            self._post_norm(layer_id, layer.post_feedforward_layernorm, "post_feedforward")
            attrs["first_layernorm"] = False
            if layer_id == self.num_layers - 1:
                attrs["last_layernorm"] = True

    return Olmo2Model
