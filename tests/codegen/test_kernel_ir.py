"""Size arithmetic in the kernel IR: equalities decide broadcasting and loop merging, so a
wrong answer here is a wrong kernel."""

import sympy

from jitopt.codegen.kernel_ir import provably_zero

s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)


def test_integers_and_polynomials():
    assert provably_zero(0) and not provably_zero(3)
    assert provably_zero((s0 + 1) * s1 - s0 * s1 - s1)
    assert not provably_zero(s0 - 1)  # equal to zero for one value only: not provably
    assert not provably_zero(s0 * s1 - s1 * s1)


def test_non_polynomial_sizes_fall_back_to_simplify():
    assert provably_zero(sympy.floor(s0 / 2) * 2 - 2 * sympy.floor(s0 / 2))
    assert provably_zero(sympy.Mod(s0, 1))
    assert not provably_zero(sympy.Mod(s0, 2))
