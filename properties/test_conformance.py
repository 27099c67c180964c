"""The suite as pytest items: ``pytest --pyargs properties --lora-target NAME`` (see pytest_plugin)."""


def test_lora_conformance(lora_cell, lora_cell_runner) -> None:
    lora_cell_runner(lora_cell)
