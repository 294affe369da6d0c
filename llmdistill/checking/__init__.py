"""Answer checking, shared by ``build`` (rejection sampling) and ``eval`` (scoring).

``extract`` finds the answer in a response, ``checkers`` judges it against a reference (one
registry: math-verify, numeric, exact, choice, code), and ``sandbox`` runs model-written code.
The same (completion, reference, checker) gets the same verdict in both stages because both
call :func:`llmdistill.checking.checkers.check`.
"""
