"""The HTTP routes, one module per area: ``kzg.py`` (``/v1/kzg/*``), ``audit.py`` (the log
and its proofs), ``auth.py`` (login, enrolment, tokens) and ``admin.py``
(``/v1/admin/*``). Each module documents its routes for OpenAPI next to them."""
