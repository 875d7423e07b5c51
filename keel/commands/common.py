"""The one CLI convention: every command is dataclass configs parsed by TrlParser (``--config FILE.yaml``
plus command-line overrides, one ``--output_dir``), and every run leaves a readable record of itself."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml
from trl import TrlParser

from interventions.serialization import KeelInputError

RECORD_NAME = "keel_config.yaml"
# Keys whose values are credentials: hub_token, push_to_hub_token, hf_token, token, *api_key, password...
# Not pad_token / eos_token (tokenizer settings) nor an intervention's ``tokens``.
SECRET_KEY = re.compile(r"(^|_)(hub_|hf_|auth_|access_)?token$|api_?key|password|secret", re.IGNORECASE)
NOT_SECRET = frozenset(
    {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}
)


def is_secret_key(key) -> bool:
    key = str(key)
    return key.lower() not in NOT_SECRET and bool(SECRET_KEY.search(key))


def make_parser(dataclass_types, prog: str, doc: str | None) -> TrlParser:
    description = (doc or "").strip().split("\n\n")[0]
    return TrlParser(dataclass_types, prog=prog, description=description)


def parse(dataclass_types, argv, prog: str, doc: str | None):
    """Parse ``argv`` into the configs; a bad config file or value exits with a message naming it."""
    parser = make_parser(dataclass_types, prog, doc)
    try:
        return parser.parse_args_and_config(args=argv)
    except yaml.YAMLError as err:
        raise SystemExit(f"{prog}: the --config file is not valid YAML: {err}") from None
    except KeelInputError as err:
        raise SystemExit(f"{prog}: {err}") from None


def without_secrets(value):
    """A copy of a config mapping with every secret-looking key's value dropped."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if is_secret_key(k) and v else without_secrets(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_secrets(v) for v in value]
    return value


def config_dict(config) -> dict:
    """A config as a plain mapping. ``TrainingArguments.to_dict`` masks every ``*_token`` value as
    ``<NAME>``; the ones that are not secrets (``pad_token``, ``eos_token``) get their values back, the
    secrets are redacted by :func:`without_secrets` when the record is written."""
    if not hasattr(config, "to_dict"):
        return dataclasses.asdict(config)
    out = config.to_dict()
    for key, value in out.items():
        if value == f"<{key.upper()}>" and not is_secret_key(key):
            out[key] = getattr(config, key, value)
    return out


def write_config_record(output_dir: str | Path, sections: dict) -> Path:
    """Write the resolved configuration (no secrets) as ``keel_config.yaml`` in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(without_secrets(sections), default=str))
    path = out / RECORD_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(plain, sort_keys=False))
    tmp.replace(path)
    return path
