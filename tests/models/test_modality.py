"""Modality groups in the MoM model: memory groups, MoMa expert MLPs, modality_ids through forward and generate()."""
from __future__ import annotations

import json

import pytest
import torch

from memmix.models import MoMConfig, MoMForCausalLM
from memmix.routing import load_balancing_loss

from models_helpers import output_cache, random_ids, tiny_mom_config, tiny_model

TOL = dict(rtol=1e-9, atol=1e-10)
GROUPS = dict(num_memories=4, topk=1, memory_groups={"text": 3, "image": 1})
TOKEN_CHOICE = dict(ffn_experts={"text": 2, "image": 2}, ffn_routing="token_choice", ffn_topk=1)
EXPERT_CHOICE = dict(ffn_experts={"text": 2, "image": 2}, ffn_routing="expert_choice")
MLPS = {"dense": {}, "token_choice": TOKEN_CHOICE, "expert_choice": EXPERT_CHOICE}
# image memory 3 / image experts 2, 3 of layer i, as parameter name -> rows of the image group
IMAGE_ROWS = {"attn.gate.weight": slice(3, 4), "attn.k_proj": slice(3, 4), "attn.v_proj": slice(3, 4),
              "attn.b_proj": slice(3, 4), "attn.a_proj": slice(3, 4), "mlp.router.weight": slice(2, 4),
              "mlp.w_gate": slice(2, 4), "mlp.w_up": slice(2, 4), "mlp.w_down": slice(2, 4)}


def modalities(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) int64 random 0/1 modality of every token."""
    return (torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) > 0.6).long()


def change_tokens(ids: torch.Tensor, where: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """ids with fresh random tokens at the positions `where` (B, T) bool."""
    other = random_ids(*ids.shape, seed=seed)
    return torch.where(where, other, ids)


# ---------------------------------------------------------------------------------------------------- config


def test_groups_keep_their_order_through_json_and_map_to_layer_sizes():
    config = tiny_mom_config(**GROUPS, **EXPERT_CHOICE | {"ffn_experts": {"text": 2, "image": 1}})
    assert config.memory_group_sizes == [3, 1] and config.ffn_expert_groups == [2, 1]
    again = MoMConfig.from_dict(json.loads(config.to_json_string()))  # JSON sorts keys: image before text
    assert list(again.memory_groups) == ["text", "image"] and again.memory_group_sizes == [3, 1]
    assert again.ffn_expert_groups == [2, 1] and again.to_dict() == config.to_dict()
    model = MoMForCausalLM(config)
    assert model.model.layers[0].attn.memory_groups == [3, 1]
    assert model.model.layers[1].mlp.expert_groups == [2, 1]


BAD = [
    (dict(memory_groups={"text": 2, "image": 1}), "summing to num_memories=4"),
    (dict(memory_groups={"text": 2, "image": 2}, topk=3), "smallest memory group"),
    (dict(memory_groups=[2, 2]), "memory_groups must be a non-empty dict"),
    (dict(memory_groups={"text": 4, "image": 0}), "memory_groups must be a non-empty dict"),
    (dict(memory_groups={"text": 2, "image": 2}, ffn_experts={"image": 1, "text": 1}), "same order"),
    (dict(memory_groups={"text": 2, "image": 2}, ffn_experts={"text": 1, "audio": 1}), "same modalities"),
    (dict(ffn_experts={"text": 2, "image": 1}, ffn_topk=2), "ffn_topk"),
    (dict(ffn_experts={"text": 2}, ffn_routing="hash"), "ffn_routing"),
    (dict(ffn_experts={"text": 2}, ffn_capacity_factor=0), "ffn_capacity_factor"),
    (dict(memory_groups={"text": 2, "image": 2}, generation_modality=2), "generation_modality"),
    (dict(generation_modality=1), "generation_modality"),
    (dict(memory_groups={"text": 2, "image": 2}, modalities=["text", "audio"]), "modalities"),
]


@pytest.mark.parametrize("overrides, match", BAD, ids=[m for _, m in BAD])
def test_bad_group_settings_name_the_argument(overrides, match):
    with pytest.raises(ValueError, match=match):
        MoMConfig(**(dict(num_memories=4, topk=1) | overrides))


def test_save_load_with_groups(tmp_path):
    model = tiny_model(seed=2, **GROUPS, **EXPERT_CHOICE)
    model.save_pretrained(tmp_path)
    loaded = MoMForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.config.memory_group_sizes == [3, 1] and loaded.config.ffn_routing == "expert_choice"
    ids, modality = random_ids(2, 9, seed=3), modalities(2, 9, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, modality_ids=modality).logits, model(ids, modality_ids=modality).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, modality_ids, match",
    [({}, torch.zeros(2, 6, dtype=torch.long), "needs modality groups"),
     (GROUPS, torch.full((2, 6), 2), r"in \[0, 2\)"),
     (GROUPS, torch.zeros(2, 5, dtype=torch.long), "shape"),
     (GROUPS, torch.zeros(2, 6), "integer tensor")],
    ids=["no-groups", "out-of-range", "too-short", "float"],
)
def test_bad_modality_ids_raise(overrides, modality_ids, match):
    model = tiny_model(**overrides)
    with pytest.raises(ValueError, match=match):
        model(random_ids(2, 6), modality_ids=modality_ids)


# ---------------------------------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("mlp", MLPS, ids=list(MLPS))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_text_outputs_never_see_image_tokens_without_shared_memory(mlp, training):
    model = tiny_model(seed=4, shared_mem=False, **GROUPS, **MLPS[mlp]).train(training)
    ids, modality = random_ids(2, 20, seed=5), modalities(2, 20, seed=5)
    image = modality.bool()
    with torch.no_grad():
        base = model(ids, modality_ids=modality, use_cache=False).logits
        moved = model(change_tokens(ids, image), modality_ids=modality, use_cache=False).logits
    torch.testing.assert_close(moved[~image], base[~image], **TOL)
    assert not torch.allclose(moved[image], base[image])


@pytest.mark.parametrize("mlp", MLPS, ids=list(MLPS))
def test_text_loss_gives_no_gradient_to_image_memories_or_experts(mlp):
    model = tiny_model(seed=6, shared_mem=False, **GROUPS, **MLPS[mlp]).train()
    ids, modality = random_ids(2, 20, seed=7), modalities(2, 20, seed=7)
    logits = model(ids, modality_ids=modality).logits
    logits[~modality.bool()].square().sum().backward()
    checked = 0
    for name, param in model.named_parameters():
        rows = next((r for key, r in IMAGE_ROWS.items() if name.endswith(key)), None)
        if rows is None or "aux_router" in name:
            continue
        text_rows = torch.ones(param.shape[0], dtype=torch.bool)
        text_rows[rows] = False
        assert param.grad[rows].abs().max() == 0, name
        assert param.grad[text_rows].abs().max() > 0, name
        checked += 1
    assert checked == 2 * (5 + (4 if mlp != "dense" else 0))


def test_text_tokens_never_write_image_memories_with_shared_memory():
    model = tiny_model(seed=8, **GROUPS, **EXPERT_CHOICE)
    ids = random_ids(2, 19, seed=9)
    with torch.no_grad():
        text_only = output_cache(model(ids, modality_ids=torch.zeros_like(ids), use_cache=True))
        modality = modalities(2, 19, seed=9)
        mixed = output_cache(model(ids, modality_ids=modality, use_cache=True))
        moved = output_cache(model(change_tokens(ids, modality.bool()), modality_ids=modality, use_cache=True))
    for state in text_only.layer_states:  # image memory (3) untouched, text and shared memories written
        assert state.memory[:, 3].abs().max() == 0 and state.memory[:, [0, 1, 2, 4]].abs().amax((1, 2, 3, 4)).min() > 0
    # layer 0: image tokens change the image and shared memories only (text memories see text tokens alone)
    torch.testing.assert_close(moved.layer_states[0].memory[:, :3], mixed.layer_states[0].memory[:, :3], **TOL)
    assert not torch.allclose(moved.layer_states[0].memory[:, 3:], mixed.layer_states[0].memory[:, 3:])


# ---------------------------------------------------------------------------------------------------- padding, losses


def test_padded_batch_equals_each_sequence_alone_and_pads_do_not_move_the_aux_loss():
    model = tiny_model(seed=10, **GROUPS, **EXPERT_CHOICE)
    lengths = (5, 11)
    seqs = [random_ids(1, n, seed=20 + n)[0] for n in lengths]
    mods = [modalities(1, n, seed=20 + n)[0] for n in lengths]
    ids = torch.full((2, 11), 7)
    modality = torch.ones(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for row, (seq, mod) in enumerate(zip(seqs, mods)):
        ids[row, 11 - len(seq):], modality[row, 11 - len(seq):], mask[row, 11 - len(seq):] = seq, mod, 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask, modality_ids=modality, output_router_logits=True, use_cache=False)
        for row, (seq, mod) in enumerate(zip(seqs, mods)):
            alone = model(seq[None], modality_ids=mod[None], use_cache=False).logits[0]
            torch.testing.assert_close(out.logits[row][mask[row].bool()], alone, **TOL)
        want = load_balancing_loss(out.router_logits, 4, 1, mask, memory_groups=[3, 1], modality_ids=modality)
        torch.testing.assert_close(out.aux_loss, want)
        pads = ~mask.bool()
        other = model(change_tokens(ids, pads), attention_mask=mask, modality_ids=modality * mask,
                      output_router_logits=True, use_cache=False)
    torch.testing.assert_close(other.aux_loss, out.aux_loss, **TOL)


@pytest.mark.parametrize("mlp", ["token_choice", "expert_choice"])
def test_training_loss_adds_the_expert_losses(mlp):
    model = tiny_model(seed=11, **GROUPS, **MLPS[mlp], aux_loss_scale=0.1, ffn_aux_router_loss_scale=0.5).train()
    ids, modality = random_ids(2, 12, seed=12), modalities(2, 12, seed=12)
    out = model(ids, labels=ids, modality_ids=modality)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    scale = 0.5 if mlp == "expert_choice" else 0.1
    torch.testing.assert_close(out.loss, ce + 0.1 * out.aux_loss + scale * out.ffn_aux_loss)
    if mlp == "token_choice":
        experts = model.model(ids, modality_ids=modality, output_router_logits=True).ffn_router_logits
        torch.testing.assert_close(out.ffn_aux_loss, load_balancing_loss(experts, 4, 1, memory_groups=[2, 2],
                                                                        modality_ids=modality))
    out.loss.backward()
    aux_router = model.model.layers[0].mlp.aux_router
    assert (aux_router is None) == (mlp == "token_choice")
    if aux_router is not None:
        assert aux_router[0].weight.grad.abs().max() > 0
        model.eval()
        assert model(ids, labels=ids, modality_ids=modality).ffn_aux_loss is None  # no BCE at inference


def test_gradient_checkpointing_gives_the_same_gradients_with_experts():
    ids, modality = random_ids(2, 9, seed=13), modalities(2, 9, seed=13)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=14, **GROUPS, **EXPERT_CHOICE).train()
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        loss = model(ids, labels=ids, modality_ids=modality).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], **TOL)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, **TOL, msg=name)


# ------------------------------------------------------------------------------------------- causality, generate


def test_expert_choice_is_causal_at_inference_but_not_in_training():
    model = tiny_model(seed=15, **GROUPS, **EXPERT_CHOICE)
    ids, modality = random_ids(2, 16, seed=16), modalities(2, 16, seed=16)
    future = torch.zeros_like(ids, dtype=torch.bool)
    future[:, 9:] = True
    with torch.no_grad():
        base = model(ids, modality_ids=modality, use_cache=False).logits
        moved = model(change_tokens(ids, future), modality_ids=modality, use_cache=False).logits
        torch.testing.assert_close(moved[:, :9], base[:, :9], **TOL)
        for block in model.model.layers:  # the experts do act at inference: removing them changes the logits
            block.mlp.w_down.zero_()
        assert not torch.allclose(model(ids, modality_ids=modality, use_cache=False).logits[:, :9], base[:, :9])
    model = tiny_model(seed=15, **GROUPS, **EXPERT_CHOICE).train()
    with torch.no_grad():  # expert choice ranks tokens across the batch: the future moves earlier outputs
        base = model(ids, modality_ids=modality).logits
        moved = model(change_tokens(ids, future), modality_ids=modality).logits
    assert not torch.allclose(moved[:, :9], base[:, :9])


@pytest.mark.parametrize("mlp", MLPS, ids=list(MLPS))
def test_cached_decoding_with_modalities_reproduces_the_full_forward(mlp):
    model = tiny_model(seed=17, **GROUPS, **MLPS[mlp])
    ids, modality = random_ids(2, 18, seed=18), modalities(2, 18, seed=18)
    with torch.no_grad():
        full = model(ids, modality_ids=modality, use_cache=False).logits
        out = model(ids[:, :6], modality_ids=modality[:, :6], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(6, 18):  # modality_ids grows with the sequence, like attention_mask
            out = model(ids[:, t:t + 1], past_key_values=cache, modality_ids=modality[:, :t + 1], use_cache=True)
            cache = output_cache(out)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


def _greedy(model, prompt, modality, new_tokens: int, new_modality: int):
    """Greedy decoding by hand, no cache: (B, T + new_tokens) ids and the logits of every step."""
    ids, scores = prompt, []
    for _ in range(new_tokens):
        logits = model(ids, modality_ids=modality, use_cache=False).logits[:, -1]
        scores.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        modality = torch.cat([modality, torch.full_like(modality[:, :1], new_modality)], 1)
    return ids, scores


@pytest.mark.parametrize("mlp", ["token_choice", "expert_choice"])
def test_generate_appends_the_generation_modality(mlp):
    model = tiny_model(seed=19, **GROUPS, **MLPS[mlp])
    prompt, modality = random_ids(2, 7, seed=20), modalities(2, 7, seed=20)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        want_ids, want_scores = _greedy(model, prompt, modality, 6, new_modality=1)
    for use_cache in (True, False):
        got = model.generate(prompt, modality_ids=modality, generation_modality=1, use_cache=use_cache, **kwargs)
        torch.testing.assert_close(got.sequences, want_ids, rtol=0, atol=0)
        torch.testing.assert_close(torch.stack(got.scores), torch.stack(want_scores).float())  # scores: float32
    as_text = model.generate(prompt, modality_ids=modality, **kwargs)  # config default: modality 0
    torch.testing.assert_close(as_text.scores[0], want_scores[0].float())  # the prompt is the same
    assert not torch.allclose(torch.stack(as_text.scores[1:]), torch.stack(want_scores[1:]).float())
    beams = model.generate(prompt, modality_ids=modality, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert beams.shape == (4, 10)
    with pytest.raises(ValueError, match="generation_modality"):
        model.generate(prompt, modality_ids=modality, generation_modality=2, max_new_tokens=2)
