"""The console summarises per intervention; the per-layer values stay in the logs (W&B, trainer_state.json)."""

from trainers.console import console_logs


def test_console_logs_fold_layers_into_one_mean_per_intervention():
    logs = {
        "loss": 1.5,
        "interventions/caft/L0/proj_after": 0.0,
        "interventions/caft/L2/proj_after": 0.2,
        "interventions/caft/L0/hits": 1.0,
        "interventions/caft/L2/hits": 1.0,
        "eval_interventions/caft/L2/proj_before": 3.0,
        "monitor/persona/L1/on": -2.0,
        "monitor/persona/L3/on": 4.0,
    }
    assert console_logs(logs) == {
        "loss": 1.5,
        "interventions/caft/proj_after": 0.1,
        "interventions/caft/hits": 1.0,
        "eval_interventions/caft/proj_before": 3.0,
        "monitor/persona/on": 1.0,
    }
    assert "interventions/caft/L0/proj_after" in logs  # the original logs are not touched
