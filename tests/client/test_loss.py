"""The response-only output layer: the same loss as full logits, the model left as it was."""

from __future__ import annotations

import torch

from fedlora.client.loss import OutputHead
from tests.client.test_privacy import IDS, LABELS, batch, tiny_lora


def test_token_logits_are_the_full_logits_rows_at_supervised_positions():
    # Prepare: full logits of the batch, outside the head's context
    model = tiny_lora()
    b = batch()
    with torch.no_grad():
        full = model(b["input_ids"], attention_mask=b["attention_mask"]).logits
        # Execute: the same batch inside the context (the model returns hidden states)
        head = OutputHead(model)
        with head:
            hidden = model(b["input_ids"], attention_mask=b["attention_mask"]).logits
            tokens = head.token_logits(hidden, b["labels"])
    # Assert: one row per labelled next token (4 + 3 + 5 + 3 = 15), equal to the full logits' rows
    assert head.response_only and hidden.shape[-1] == 16  # hidden size, not the vocabulary
    assert tokens.logits.shape == (15, 64)
    assert tokens.rows.tolist() == [0] * 4 + [1] * 3 + [2] * 5 + [3] * 3
    expected = torch.cat([full[i, [t - 1 for t, lab in enumerate(LABELS[i]) if lab != -100]]
                          for i in range(len(IDS))])
    torch.testing.assert_close(tokens.logits, expected, atol=1e-5, rtol=1e-5)


def test_mean_loss_equals_the_models_own_loss_and_per_example_each_examples_alone():
    # Prepare
    model = tiny_lora()
    b = batch()
    head = OutputHead(model)
    with torch.no_grad():
        own = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        alone = [model(torch.tensor([ids]), labels=torch.tensor([lab])).loss for ids, lab in zip(IDS, LABELS)]
        # Execute
        with head:
            tokens = head.token_logits(model(b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                       b["labels"])
    # Assert
    torch.testing.assert_close(tokens.mean_loss(), own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.per_example_loss(), torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_the_output_layer_is_restored_after_the_context_also_on_error():
    # Prepare
    model = tiny_lora()
    lm_head = model.get_base_model().lm_head
    # Execute
    try:
        with OutputHead(model):
            assert isinstance(model.get_base_model().lm_head, torch.nn.Identity)
            raise RuntimeError("a failed step")
    except RuntimeError:
        pass
    # Assert
    assert model.get_base_model().lm_head is lm_head


def test_a_trainable_output_layer_keeps_full_logits():
    # Prepare: the output layer trains (as with an adapter on lm_head)
    model = tiny_lora()
    model.get_base_model().lm_head.weight.requires_grad_(True)
    b = batch()
    head = OutputHead(model)
    # Execute
    with head:
        out = model(b["input_ids"], attention_mask=b["attention_mask"]).logits
        tokens = head.token_logits(out, b["labels"])
    # Assert: nothing swapped, the loss still counts only the supervised positions
    assert not head.response_only and out.shape[-1] == 64 and tokens.logits.shape == (15, 64)
