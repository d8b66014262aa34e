"""The engine every jfocal loss is built on (internal: its names may change between releases).

One call, e.g. ``jfocal.sigmoid_focal_loss(logits, labels, gamma=2.0)``, flows:

1. `program.program` (the decorator of every public loss) binds the call to
   the loss's signature, sorts options into static and traced ones, checks
   concrete hyper-parameter values, and runs the loss's body as one cached
   ``jax.jit`` program.
2. In the body, the family's ``prepare`` (`sigmoid.prepare`,
   `softmax.prepare`) checks shapes and dtypes (`checks`) and turns labels,
   masks, weights, ``ignore_index``, label smoothing and ``pos_weight`` into
   elementwise inputs.
3. The loss's elementwise core, a ``jax.custom_jvp`` function with one
   analytic derivative rule, computes the value: sigmoid cores get the
   folded factor of `sigmoid.fold` (alpha_t, weights, mask, NaN for invalid
   labels) and work on the folded frame `sigmoid.Folded`; softmax terms get
   the negative log-probabilities of `softmax.log_normalizer` and are summed
   by `softmax.example_loss`.
4. `reduce.reduce` (through the family's ``reduce``) sums or averages, over
   the unmasked entries, a normaliser or the positives, globally over
   ``axis_name``.

The fused losses of a linear layer's logits (``jfocal.linear_softmax_*``) take
the same softmax cores through `vocab`, which streams ``features @ kernel``
over vocabulary blocks under one ``jax.custom_vjp`` and hands the per-token
loss to step 4.

`numerics` holds the shared building blocks (powers for static and traced
exponents, the per-platform CPU fence, the fast log1p) and `types` the
types of the public signatures.
"""
