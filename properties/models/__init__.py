"""The model half of the suite: LoRA on whole transformers models, tested like the layers.

A cell is property x architecture x dtype. ``spec`` says what a model target is handed,
``strategies`` draws it, ``oracle`` turns each adapted module into a layer-half spec for the float64
answer and the precision bound, ``checks`` holds the ``model_*`` properties and ``targets`` the model
targets (the reference on ``lora_core``, PEFT). The runner, sessions, reports, xfails, shards and
the pytest plugin are the layer half's.
"""
