"""pymilter adapter: turns milter callbacks into message facts and applies the decision as header edits.

A subpackage, not a top-level ``milter`` package, which would shadow pymilter's own C module ``milter``.
"""

from requiretls.milter.app import RequireTLSMilter, serve

__all__ = ["RequireTLSMilter", "serve"]
