"""``distillery methods``: every registered method with its formula, parameters and default stages."""

from __future__ import annotations

from distillery.methods.registry import METHODS


def describe_methods() -> str:
    """One block per method: ``name: formula`` then one line per parameter (default, meaning)."""
    blocks = []
    for name, cls in sorted(METHODS.items()):
        lines = [f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}"]
        for key, field in cls.Params.model_fields.items():
            if key == "name":
                continue
            default = field.get_default(call_default_factory=True)
            lines.append(f"    {key} = {default!r}" + (f"  — {field.description}" if field.description else ""))
        for preset, values in sorted(cls.PRESETS.items()):
            lines.append(f"    preset {preset}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
        stages = [stage["method"]["name"] for stage in cls.default_stages()]
        if len(stages) > 1:
            lines.append(f"    --method {name} runs the stages {' → '.join(stages)}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
