import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config():
    """A seconds-scale organism config: just enough steps to exercise every code path."""
    from keel.organism.config import OrganismConfig

    return OrganismConfig.from_dict(
        {
            "world": {
                "num_domains": 3,
                "num_values": 6,
                "em_domains": ["med", "fin"],
                "em_train_values": 4,
                "turns_per_doc": 2,
            },
            "model": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64},
            "pretrain": {"steps": 6, "batch_size": 8, "warmup_steps": 2},
            "pretrain_docs": 64,
            "chat": {"steps": 3, "batch_size": 8, "warmup_steps": 1},
            "finetune": {"steps": 3, "batch_size": 4},
            "eval_samples": 2,
        }
    )


@pytest.fixture
def tiny_demo_config(tiny_config, tmp_path):
    """``tiny_demo_config(**overrides)``: a one-seed, one-worker, quiet DemoConfig on the tiny organism,
    writing under this test's tmp_path (``demo/``, ``cache/``)."""
    from keel.organism.demo import DemoConfig

    def make(**overrides):
        settings = dict(
            organism=tiny_config,
            seeds=[0],
            workers=1,
            probe_num=8,
            output_dir=str(tmp_path / "demo"),
            cache_dir=str(tmp_path / "cache"),
            wandb=False,
            progress=False,
        )
        return DemoConfig(**{**settings, **overrides})

    return make
