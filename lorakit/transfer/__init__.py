"""Cross-model transfer of LoRA adapters (optional extra ``lorakit[transfer]``).

* Trans-LoRA synthetic-data distillation, as four roles (:mod:`.generator`, :mod:`.discriminator`,
  :mod:`.teacher`, :mod:`.student`) run by :mod:`.pipeline` (``prepare`` a kit, ``run`` a resumable transfer);
  the kit layout and run state are in :mod:`.kit`.
* Training-free projection between same-shape bases: :mod:`.projection`.

transformers/peft/accelerate are imported lazily, so ``import lorakit.transfer`` works without them.
"""
