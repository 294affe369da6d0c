"""Answer checking, shared by ``build`` (rejection sampling) and ``eval`` (scoring).

``extract`` finds the answer in a response (and defines the think tags), ``numbers`` is the
exact numeric rule, ``checkers`` judges an answer against a :class:`~llmdistill.checking.checkers.Reference`
(one registry, ``CHECKERS``: math, numeric, exact, choice, code, none), and ``sandbox`` runs
model-written code. The same (completion, reference, checker) gets the same verdict in both
stages because both call :func:`llmdistill.checking.checkers.check` (through ``check_many``).
"""
