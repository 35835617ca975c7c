"""samkit inside the training loops people already use.

One module per outside library, each imported only when used (the core never needs these packages):

* :mod:`samkit.integrations.lightning`: ``SharpnessAwareModule``, a LightningModule base class;
* :mod:`samkit.integrations.accelerate`: ``prepare_optimizer``, an accelerate-wrapped optimizer that
  buffers micro-batches under ``accelerator.accumulate``;
* :mod:`samkit.integrations.transformers`: ``SharpnessAwareTrainer``, a ``transformers.Trainer``;
* :mod:`samkit.integrations.peft`: a pretrained vision transformer (CLIP vision tower or ViT) with a LoRA
  adapter and a linear head, for fine-tuning in ``samkit train`` (``model.name=hf:<folder or hub name>``).

What they share: the samples of one step are handed to samkit as micro-batches (closures that
re-evaluate the model, with their labels), so N accumulated micro-batches give exactly samkit's step on
the N micro-batches, for every method, and what is logged comes from the clean pass at w.
"""
