"""Element symbols and atomic numbers (IUPAC 2016, Z = 1…118)."""

from edkit.errors import EdkitError

# Element symbols by atomic number (IUPAC 2016, Z = 1…118); D and T are hydrogen isotopes.
ELEMENTS: tuple[str, ...] = tuple(
    """H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As
    Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd
    Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am
    Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og""".split()
)
_ATOMIC_NUMBER = {s: z for z, s in enumerate(ELEMENTS, start=1)} | {"D": 1, "T": 1}


def atomic_number(symbol: str) -> int:
    """Atomic number of an element symbol ("Si" → 14; "D"/"T" → 1). Case-sensitive.

    Raises:
      EdkitError: ``symbol`` is not an element symbol.
    """
    try:
        return _ATOMIC_NUMBER[symbol]
    except KeyError:
        raise EdkitError(
            f"element {symbol!r} is not an element symbol (expected e.g. 'Si', 'O', 'Fe')"
        ) from None
