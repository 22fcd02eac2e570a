"""Exceptions raised by dm_jax."""

from dm_jax.core import primitives


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
    msg += f". Supported: {primitives.supported_summary()}."
    super().__init__(msg)
