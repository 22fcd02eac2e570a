"""Exceptions raised by dm_jax."""


class UnsupportedPrimitiveError(NotImplementedError):
  """A traced model uses an operation that a bound domain cannot propagate.

  The message names the JAX primitive (e.g. ``sin``) and the domain, so users can
  see which layer of their model is the problem.
  """

  def __init__(self, primitive: str, domain: str, detail: str = ""):
    self.primitive = primitive
    self.domain = domain
    msg = (f"Primitive '{primitive}' is not supported by the {domain} domain "
           "when it depends on the perturbed input")
    if detail:
      msg += f": {detail}"
    msg += (". Supported: affine maps (dot_general, conv_general_dilated, add/sub/mul/div "
            "by constants, reshape, transpose, broadcast, concatenate, pad, reduce_sum, "
            "avg pooling), ReLU (max with a constant), max pooling (reduce_window_max), "
            "and calls (jit/custom_jvp) made of these.")
    super().__init__(msg)
