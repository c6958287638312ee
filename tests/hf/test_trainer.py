"""transformers.Trainer fine-tunes FeatureAttentionForCausalLM on CPU (the docs/hf.md recipe;
Trainer needs accelerate, one of the test extras)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch.utils.data import Dataset  # noqa: E402

import featattn  # noqa: E402


class _Tokens(Dataset):
    def __init__(self, n=64, length=16):
        self.ids = torch.randint(0, 32, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    config = featattn.FeatureAttentionConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, feature_map="elu")
    model = featattn.FeatureAttentionForCausalLM(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=16,
        learning_rate=2e-2, logging_steps=3, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    trainer.save_model(str(tmp_path))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 32, (1, 7))
    torch.testing.assert_close(again(ids).logits, model.eval()(ids).logits)
