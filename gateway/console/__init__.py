"""The auditor's console at ``/console/``: server-rendered pages over the audit and
identity services, with proofs checked in the browser (``static/verifier.js``).

Kept free of imports: ``gateway.security`` reads the session cookie through
``gateway.console.session`` while ``gateway.console.routes`` imports the security module.
"""
