"""Liger-Kernel's mini-model configs (test/convergence/*/test_mini_models*.py, MINI_MODEL_SETUPS), cut to size for
the CPU as tests/test_liger_mini_model_peer_cases.py says: each function builds one family's randomly initialised
model."""

import transformers

T = transformers  # short: the configs below name many of its classes

VOCAB = 500  # Liger's 32000 / 64
VL_VOCAB = 512  # Liger's Qwen-VL 32768 / 64
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=128)
TWO_LAYER_TYPES = ["linear_attention", "full_attention"]  # Liger's 3:1 linear / full pattern cut to 2 layers
TINY_VISION_QWEN3 = dict(depth=1, hidden_size=32, hidden_act="gelu_pytorch_tanh", intermediate_size=64, num_heads=2,
                         patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                         num_position_embeddings=16)
MM_TOKENS = dict(image_token_id=4, video_token_id=5, vision_start_token_id=1, vision_end_token_id=2)


def _text(vocab=VOCAB, **fields):
    return {**SMALL, "vocab_size": vocab, **fields}


def _small_siglip():
    return T.SiglipVisionConfig(hidden_size=32, image_size=28, intermediate_size=64, num_attention_heads=2,
                                num_hidden_layers=1, patch_size=14)


def _gemma_fields(**fields):
    return _text(head_dim=16, hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=True, attention_bias=False, **fields)


# test/convergence/fp32/test_mini_models.py's MINI_MODEL_SETUPS, cut to size.

def mini_llama3():
    return T.LlamaForCausalLM(T.LlamaConfig(**_text(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                                   attention_bias=False, attn_implementation="sdpa")))


def mini_qwen2():
    return T.Qwen2ForCausalLM(T.Qwen2Config(**_text(bos_token_id=1, eos_token_id=2, sliding_window=131072,
                                                   tie_word_embeddings=True, attn_implementation="sdpa")))


def mini_phi3():
    # Phi-3's default pad id 32000 sits inside its 32064 vocabulary: 500 of 501 here.
    return T.Phi3ForCausalLM(T.Phi3Config(**_text(501, bos_token_id=1, eos_token_id=2, pad_token_id=500,
                                                 num_key_value_heads=None, sliding_window=None,
                                                 tie_word_embeddings=False, attn_implementation="eager")))


def mini_mistral():
    return T.MistralForCausalLM(T.MistralConfig(**_text(bos_token_id=1, eos_token_id=2, sliding_window=4096,
                                                       tie_word_embeddings=False, attn_implementation="sdpa")))


def mini_mixtral():
    return T.MixtralForCausalLM(T.MixtralConfig(**_text(bos_token_id=1, eos_token_id=2, sliding_window=4096,
                                                       num_local_experts=4, tie_word_embeddings=False,
                                                       attn_implementation="sdpa")))


def mini_gemma1():
    # hidden_act="gelu" as Liger sets it (Gemma maps it to the tanh approximation).
    return T.GemmaForCausalLM(T.GemmaConfig(**_text(head_dim=16, hidden_act="gelu", pad_token_id=0, bos_token_id=1,
                                                   eos_token_id=2, tie_word_embeddings=True, attention_bias=False)))


def mini_gemma1_1():
    return T.GemmaForCausalLM(T.GemmaConfig(**_gemma_fields()))


def mini_gemma2():
    return T.Gemma2ForCausalLM(T.Gemma2Config(**_gemma_fields(attn_implementation="eager")))


def mini_ministral():
    return T.MinistralForCausalLM(T.MinistralConfig(**_text(head_dim=16, bos_token_id=1, eos_token_id=2,
                                                           sliding_window=4096, tie_word_embeddings=False,
                                                           attn_implementation="sdpa")))


def mini_llama4():
    return T.Llama4ForCausalLM(T.Llama4TextConfig(**_text(head_dim=16, intermediate_size_mlp=64, num_local_experts=4,
                                                         bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                                         tie_word_embeddings=False, attention_bias=True,
                                                         attn_implementation="sdpa")))


def mini_qwen3():
    return T.Qwen3ForCausalLM(T.Qwen3Config(**_text(head_dim=16, bos_token_id=1, eos_token_id=2, sliding_window=131072,
                                                   tie_word_embeddings=True, attn_implementation="sdpa")))


def mini_qwen3_moe():
    return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**_text(
        head_dim=16, tie_word_embeddings=False, attention_bias=False, use_sliding_window=False, decoder_sparse_step=1,
        moe_intermediate_size=24, num_experts_per_tok=2, num_experts=4, norm_topk_prob=False,
        output_router_logits=False, router_aux_loss_coef=0.001, mlp_only_layers=None)))


def mini_gpt_oss():
    return T.GptOssForCausalLM(T.GptOssConfig(**_text(
        intermediate_size=32, head_dim=16, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.9, output_router_logits=False, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"])))


def mini_gemma3_text():
    return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_gemma_fields(attn_implementation="eager") | dict(
        bos_token_id=2, eos_token_id=1)))


def mini_mllama():
    return T.MllamaForCausalLM(T.MllamaTextConfig(**_text(bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                                         cross_attention_layers=None, tie_word_embeddings=False,
                                                         attn_implementation="sdpa")))


def _qwen_vl_text(**fields):
    return _text(VL_VOCAB, bos_token_id=1, eos_token_id=2, sliding_window=4096, use_sliding_window=False,
                 max_window_layers=2, tie_word_embeddings=False, **fields)


# Liger's Qwen-VL special tokens at vocab - 3, - 2, + 0, + 1.
QWEN_VL_TOKENS = dict(vision_start_token_id=VL_VOCAB - 3, vision_end_token_id=VL_VOCAB - 2, image_token_id=VL_VOCAB,
                      video_token_id=VL_VOCAB + 1)


def mini_qwen2_vl():
    vision = dict(depth=1, embed_dim=32, mlp_ratio=1, num_heads=2, hidden_size=32, patch_size=14,
                  spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2)
    config = T.Qwen2VLConfig(text_config=_qwen_vl_text(rope_parameters={"mrope_section": [2, 3, 3]}),
                             vision_config=vision, **QWEN_VL_TOKENS)
    return T.Qwen2VLForConditionalGeneration(config)


def mini_qwen2_5_vl():
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, window_size=112, fullatt_block_indexes=[0], tokens_per_second=2,
                  temporal_patch_size=2)
    config = T.Qwen2_5_VLConfig(text_config=_qwen_vl_text(rope_parameters={"mrope_section": [2, 3, 3]}),
                                vision_config=vision, **QWEN_VL_TOKENS)
    return T.Qwen2_5_VLForConditionalGeneration(config)


def mini_qwen3_vl():
    config = T.Qwen3VLConfig(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attn_implementation="sdpa",
                             text_config=_text(VL_VOCAB, head_dim=16),
                             vision_config=TINY_VISION_QWEN3 | dict(hidden_act="silu", deepstack_visual_indexes=[]),
                             **QWEN_VL_TOKENS)
    return T.Qwen3VLForConditionalGeneration(config)


def mini_qwen3_vl_moe():
    text = _text(VL_VOCAB, head_dim=16, attention_bias=False, decoder_sparse_step=1, moe_intermediate_size=48,
                 num_experts_per_tok=2, num_experts=4, mlp_only_layers=[], tie_word_embeddings=False,
                 pad_token_id=None)
    config = T.Qwen3VLMoeConfig(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attn_implementation="sdpa",
                                text_config=text, vision_config=TINY_VISION_QWEN3 | dict(deepstack_visual_indexes=[0]),
                                **QWEN_VL_TOKENS)
    return T.Qwen3VLMoeForConditionalGeneration(config)


def mini_granite3():
    return T.GraniteForCausalLM(T.GraniteConfig(**_text(bos_token_id=1, eos_token_id=2, attention_bias=False,
                                                       attention_dropout=0.1, tie_word_embeddings=False,
                                                       attn_implementation="sdpa")))


def mini_olmo2():
    return T.Olmo2ForCausalLM(T.Olmo2Config(**_text(bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                                   tie_word_embeddings=False, attn_implementation="sdpa")))


def mini_olmo3():
    return T.Olmo3ForCausalLM(T.Olmo3Config(**_text(bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                                   tie_word_embeddings=False, attn_implementation="sdpa")))


def mini_glm4():
    return T.Glm4ForCausalLM(T.Glm4Config(**_text(bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                                 partial_rotary_factor=0.5, tie_word_embeddings=False,
                                                 attention_bias=True, attn_implementation="sdpa")))


# Liger's GLM-4V special tokens lie past its vocabulary; here too.
GLM_TOKENS = dict(image_start_token_id=VOCAB + 7, image_end_token_id=VOCAB + 8, video_start_token_id=VOCAB + 9,
                  video_end_token_id=VOCAB + 10, image_token_id=VOCAB + 11, video_token_id=VOCAB + 12)
GLM_VISION = dict(depth=1, hidden_act="silu", hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
# One head of 32: half of it rotary, 8 frequencies, Liger's mrope sections [8, 12, 12] / 4.
GLM_ROPE = {"rope_type": "default", "partial_rotary_factor": 0.5, "mrope_section": [2, 3, 3]}


def _glm_text(**fields):
    return _text(num_attention_heads=1, rope_parameters=GLM_ROPE, attention_bias=True, **fields)


def mini_glm4v():
    config = T.Glm4vConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                           attn_implementation="sdpa", text_config=_glm_text(pad_token_id=None),
                           vision_config=GLM_VISION, **GLM_TOKENS)
    return T.Glm4vForConditionalGeneration(config)


def mini_glm4v_moe():
    text = _glm_text(attention_dropout=0.0, moe_intermediate_size=24, num_experts_per_tok=2, n_shared_experts=1,
                     n_routed_experts=4, routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense_replace=1,
                     norm_topk_prob=True)
    config = T.Glm4vMoeConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                              attn_implementation="sdpa", text_config=text, vision_config=GLM_VISION, **GLM_TOKENS)
    return T.Glm4vMoeForConditionalGeneration(config)


def mini_llava():
    text = T.LlamaConfig(**_text(501, bos_token_id=1, eos_token_id=2, attention_bias=False, tie_word_embeddings=False,
                                 attn_implementation="sdpa"))
    vision = T.CLIPVisionConfig(hidden_size=32, image_size=28, intermediate_size=64, num_attention_heads=2,
                                num_hidden_layers=2, patch_size=14, projection_dim=32)
    config = T.LlavaConfig(text_config=text, vision_config=vision, vocab_size=501, ignore_index=-100, pad_token_id=4,
                           image_token_index=3, projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default", attn_implementation="sdpa")
    return T.LlavaForConditionalGeneration(config)


def mini_smollm3():
    return T.SmolLM3ForCausalLM(T.SmolLM3Config(**_text(bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                                       attention_bias=False, tie_word_embeddings=False,
                                                       attn_implementation="sdpa")))


def mini_internvl(image_token_id=10):
    text = T.Qwen2Config(**_text(bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = T.InternVLConfig(text_config=text, vision_config=vision, image_token_id=image_token_id,
                              attn_implementation="sdpa")
    return T.InternVLForConditionalGeneration(config)


def mini_falcon_h1(**fields):
    return T.FalconH1ForCausalLM(T.FalconH1Config(**_text(
        head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, mamba_d_ssm=32,
        mamba_n_heads=4, mamba_d_state=8, mamba_d_conv=2, mamba_chunk_size=8, **fields)))


# The gated-delta-rule (linear attention) layers, Liger's widths / 8.
LINEAR_ATTENTION = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                        linear_num_key_heads=2, linear_num_value_heads=2, layer_types=TWO_LAYER_TYPES)


def _linear_attention(**fields):
    return _text(head_dim=16, tie_word_embeddings=False, attention_bias=False, **LINEAR_ATTENTION, **fields)


def mini_qwen3_next():
    return T.Qwen3NextForCausalLM(T.Qwen3NextConfig(**_linear_attention(
        decoder_sparse_step=1, moe_intermediate_size=24, shared_expert_intermediate_size=24, num_experts_per_tok=2,
        num_experts=4, norm_topk_prob=False, output_router_logits=False, router_aux_loss_coef=0.001)))


def mini_qwen3_5_moe():
    return T.Qwen3_5MoeForCausalLM(T.Qwen3_5MoeTextConfig(**_linear_attention(
        moe_intermediate_size=24, shared_expert_intermediate_size=24, num_experts_per_tok=2, num_experts=4,
        output_router_logits=False, router_aux_loss_coef=0.001)))


def mini_qwen3_5():
    return T.Qwen3_5ForCausalLM(T.Qwen3_5TextConfig(**_linear_attention()))


def mini_hunyuan_v1():
    return T.HunYuanDenseV1ForCausalLM(T.HunYuanDenseV1Config(**_text(
        head_dim=16, bos_token_id=1, eos_token_id=2, partial_rotary_factor=1.0, tie_word_embeddings=True,
        attn_implementation="sdpa")))


def mini_hunyuan_v1_moe():
    return T.HunYuanMoEV1ForCausalLM(T.HunYuanMoEV1Config(**_text(
        head_dim=16, partial_rotary_factor=1.0, tie_word_embeddings=True, num_experts=4, moe_topk=2,
        attn_implementation="sdpa")))


def mini_deepseek_v4():
    # Liger's config is already tiny but for its vocabulary; its four layers show each attention and MoE kind.
    return T.DeepseekV4ForCausalLM(T.DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, q_lora_rank=8, num_experts_per_tok=2, n_routed_experts=4, hc_mult=2,
        sliding_window=8, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention",
                     "sliding_attention"],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], max_position_embeddings=128))


def mini_exaone4():
    return T.Exaone4ForCausalLM(T.Exaone4Config(**_text(bos_token_id=1, eos_token_id=2, pad_token_id=None,
                                                       tie_word_embeddings=True, attn_implementation="sdpa")))


def mini_nemotron():
    return T.NemotronForCausalLM(T.NemotronConfig(**_text(bos_token_id=1, eos_token_id=2, hidden_act="relu2",
                                                         attention_bias=False)))


# test/convergence/fp32/test_mini_models_multimodal.py's MINI_MODEL_SETUPS, cut to size, built with their vision
# towers and trained on text alone.

def mm_paligemma(text_config=T.GemmaConfig):
    config = T.PaliGemmaConfig(vision_config=_small_siglip(), text_config=text_config(**_gemma_fields()),
                               image_token_index=4, attn_implementation="eager", vocab_size=VOCAB, projection_dim=32)
    return T.PaliGemmaForConditionalGeneration(config)


def mm_paligemma2():
    return mm_paligemma(T.Gemma2Config)


def mm_gemma3():
    text = T.Gemma3TextConfig(**_text(head_dim=16, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                      attention_bias=False))
    config = T.Gemma3Config(vision_config=_small_siglip().to_dict(), text_config=text, image_token_index=5,
                            boi_token_index=4, eoi_token_index=6, mm_tokens_per_image=4)
    return T.Gemma3ForConditionalGeneration(config)


def mm_gemma4():
    text = T.Gemma4TextConfig(**_text(head_dim=16, tie_word_embeddings=True, attention_bias=False,
                                      num_kv_shared_layers=0, use_double_wide_mlp=False, enable_moe_block=False,
                                      hidden_size_per_layer_input=0))
    vision = T.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, head_dim=16, hidden_activation="gelu_pytorch_tanh",
                                  patch_size=16, position_embedding_size=64)
    config = T.Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=5,
                            boi_token_id=4, eoi_token_id=6, video_token_id=7, boa_token_id=4, eoa_token_index=6,
                            attn_implementation="eager")
    return T.Gemma4ForConditionalGeneration(config)


def mm_smolvlm2():
    text = T.LlamaConfig(**_text(770, bos_token_id=1, eos_token_id=2, pad_token_id=2, attention_bias=False,
                                 initializer_range=0.041666666666666664, tie_word_embeddings=False))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    # Liger's image token 49190 of 49280: the vocabulary's last 90, here 5 from the end.
    config = T.SmolVLMConfig(text_config=text, vision_config=vision, image_token_id=765, attn_implementation="sdpa")
    return T.SmolVLMForConditionalGeneration(config)


def _mm_qwen_vl(config_cls, model_cls, vision):
    text = _text(bos_token_id=0, eos_token_id=0, rope_parameters={"mrope_section": [2, 3, 3]}, sliding_window=4096,
                 use_sliding_window=False, max_window_layers=2, tie_word_embeddings=True, use_cache=False)
    config = config_cls(text_config=text, vision_config=vision, vision_start_token_id=1, vision_end_token_id=2,
                        image_token_id=4, video_token_id=5, tie_word_embeddings=True, attn_implementation="sdpa")
    return model_cls(config)


def mm_qwen2_vl():
    return _mm_qwen_vl(T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration,
                       dict(depth=1, embed_dim=32, mlp_ratio=1, num_heads=2, hidden_size=32))


def mm_qwen2_5_vl():
    return _mm_qwen_vl(T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration,
                       dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32))


def _mm_qwen3(config_cls, model_cls, vision=TINY_VISION_QWEN3 | dict(deepstack_visual_indexes=[0]), **text):
    text = _text(head_dim=16, tie_word_embeddings=True, use_cache=False, attention_bias=False, **text)
    config = config_cls(attn_implementation="sdpa", tie_word_embeddings=True, text_config=text, vision_config=vision,
                        **MM_TOKENS)
    return model_cls(config)


MM_MOE = dict(moe_intermediate_size=48, num_experts_per_tok=2, num_experts=4)


def mm_qwen3_vl():
    return _mm_qwen3(T.Qwen3VLConfig, T.Qwen3VLForConditionalGeneration)


def mm_qwen3_vl_moe():
    return _mm_qwen3(T.Qwen3VLMoeConfig, T.Qwen3VLMoeForConditionalGeneration, decoder_sparse_step=1,
                     mlp_only_layers=[], **MM_MOE)


def mm_qwen3_5():
    return _mm_qwen3(T.Qwen3_5Config, T.Qwen3_5ForConditionalGeneration, pad_token_id=None, **LINEAR_ATTENTION)


def mm_qwen3_5_moe():
    return _mm_qwen3(T.Qwen3_5MoeConfig, T.Qwen3_5MoeForConditionalGeneration, vision=TINY_VISION_QWEN3,
                     shared_expert_intermediate_size=48, pad_token_id=None, **LINEAR_ATTENTION, **MM_MOE)


def mm_mllama():
    vision = T.MllamaVisionConfig(hidden_size=32, image_size=28, intermediate_layers_indices=[0], intermediate_size=64,
                                  max_num_tiles=1, num_attention_heads=2, num_global_layers=1, num_hidden_layers=1,
                                  patch_size=14, supported_aspect_ratios=[[1, 1]], vision_output_dim=64)
    # Liger's cross-attention layer 2 of 4: layer 1 of 2 here (skipped without an image, as in any text-only call).
    text = T.MllamaTextConfig(**_text(bos_token_id=0, eos_token_id=0, pad_token_id=0, cross_attention_layers=[1],
                                      tie_word_embeddings=False))
    config = T.MllamaConfig(vision_config=vision, text_config=text, image_token_index=1, attn_implementation="sdpa")
    return T.MllamaForConditionalGeneration(config)


def mm_llama4():
    vision = T.Llama4VisionConfig(hidden_size=32, image_size=28, intermediate_size=64, num_attention_heads=2,
                                  num_hidden_layers=1, patch_size=14, vision_output_dim=64, projector_input_dim=32,
                                  projector_output_dim=32)
    text = T.Llama4TextConfig(**_text(head_dim=16, intermediate_size_mlp=64, num_local_experts=4, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0, tie_word_embeddings=False))
    config = T.Llama4Config(image_token_index=8, vision_config=vision, text_config=text, attn_implementation="sdpa")
    return T.Llama4ForConditionalGeneration(config)


def mm_llava():
    return mini_llava()  # the multimodal file's config is the fp32 file's


def mm_internvl():
    return mini_internvl(image_token_id=24)


# test/convergence/bf16/test_mini_models.py's own config.

def mini_gemma4_text():
    return T.Gemma4ForCausalLM(T.Gemma4TextConfig(**_text(
        head_dim=16, hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=2, eos_token_id=1,
        tie_word_embeddings=True, attention_bias=False, attn_implementation="eager", final_logit_softcapping=30.0,
        sliding_window=1024, layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0,
        use_double_wide_mlp=False, enable_moe_block=False, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=VOCAB)))


def mini_falcon_h1_eager():
    return mini_falcon_h1(attn_implementation="eager")  # the bf16 file's Falcon-H1 config adds eager attention
