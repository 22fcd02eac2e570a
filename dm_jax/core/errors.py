"""Exceptions raised by dm_jax."""

from dm_jax.core import primitives


class UnsupportedPrimitiveError(NotImplementedError):
  """A traced model uses an operation that a bound domain cannot propagate.

  The message names the JAX primitive (e.g. ``sin``) and the domain, so users can
  see which layer of their model is the problem, and says which domains do support that
  primitive (``supported_by``, read from :mod:`dm_jax.core.primitives`' table).
  """

  def __init__(self, primitive: str, domain: str, detail: str = ""):
    self.primitive = primitive
    self.domain = domain
    msg = (f"Primitive '{primitive}' is not supported by the {domain} domain "
           "when it depends on the perturbed input")
    if detail:
      msg += f": {detail}"
    self.supported_by = primitives.supported_by(primitive)
    msg += (f". '{primitive}' is supported by {self.supported_by}. Supported: "
            f"{primitives.supported_summary()}.")
    super().__init__(msg)
