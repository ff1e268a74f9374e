"""Helpers shared by the tests (not collected): the float64 MSDA oracle and the SIMT-emulator loaders and checks.
The tests import them as ``support.*`` (pytest puts tests/ on sys.path).
"""
