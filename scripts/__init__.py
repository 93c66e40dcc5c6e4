"""The experiment scripts and their helpers; part of the checkout, not of the installed package.

A regular package (not a namespace one) so that ``scripts.support`` resolves to this checkout
once its root is on ``sys.path``, whatever else is installed under the name ``scripts``.
"""
