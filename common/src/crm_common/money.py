"""Money, the one vocabulary every service uses: a Decimal amount in an ISO 4217
currency, never a float.

Rules (enforced by `parse_amount` and `Money`):

- currency codes are canonicalised first (surrounding blanks dropped, upper
  case) and must be an active ISO 4217 code that prices are quoted in;
- amounts are decimals given as text, `Decimal` or `int`; floats are refused;
- an amount may not carry more fractional digits than its currency's minor
  unit (1.005 USD is refused rather than silently rounded) and is stored
  quantised to exactly that many digits (100 USD is kept as 100.00);
- computed amounts (line totals, weighted forecasts) are rounded half-even to
  the minor unit, once, at the end of the computation;
- NaN, infinities and amounts of 10**15 or more are refused, and the bound is
  checked on the number itself, so `1e999999` never becomes a million digits.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from crm_common.errors import ValidationFailed

# Active ISO 4217 codes and their minor units (digits after the decimal point).
# Precious metals, testing codes and bond-market units are left out; so are
# withdrawn codes (ANG was replaced by XCG in 2025).
_CODES_BY_MINOR_UNIT = {
    0: "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF",
    3: "BHD IQD JOD KWD LYD OMR TND",
    4: "CLF UYW",
    2: (
        "AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN "
        "BWP BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN "
        "ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD "
        "KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR "
        "MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON "
        "RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT "
        "TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG"
    ),
}

#: Every currency the platform accepts, with its minor unit.
CURRENCIES: Mapping[str, int] = {
    code: digits for digits, codes in _CODES_BY_MINOR_UNIT.items() for code in codes.split()
}

MAX_AMOUNT = Decimal(10) ** 15
#: The largest and smallest magnitude (power of ten) of any decimal input.
MAX_EXPONENT = 100


def canonical_currency(code: str, field: str = "currency") -> str:
    """`" eur"` -> `EUR`; anything that is not an accepted ISO 4217 code is refused."""
    canonical = code.strip().upper()
    if canonical not in CURRENCIES:
        if not canonical:
            raise ValidationFailed.of(field, "an ISO 4217 currency code is required")
        raise ValidationFailed.of(field, f"{code[:20]!r} is not an ISO 4217 currency code")
    return canonical


def minor_units(currency: str) -> int:
    """Decimal places of a canonical currency's minor unit."""
    return CURRENCIES[currency]


@functools.cache
def quantum(currency: str) -> Decimal:
    """The smallest amount of a canonical currency: `Decimal("0.01")` for EUR."""
    return Decimal(1).scaleb(-CURRENCIES[currency])


def parse_decimal(value: str | Decimal | int, field: str) -> Decimal:
    """A finite Decimal from text, a Decimal or an int (never a float)."""
    if isinstance(value, bool | float):
        raise ValidationFailed.of(field, "must be a decimal number given as text, not a float")
    if isinstance(value, Decimal):
        number = value
    else:
        text = str(value).strip()
        if len(text) > 100:
            raise ValidationFailed.of(field, "is too long to be a number")
        try:
            number = Decimal(text)
        except InvalidOperation:
            raise ValidationFailed.of(field, f"{text[:40]!r} is not a decimal number") from None
    if not number.is_finite():
        raise ValidationFailed.of(field, "must be a finite number")
    if number and not -MAX_EXPONENT <= number.adjusted() <= MAX_EXPONENT:
        # 1e1000000 is a valid Decimal, but arithmetic on it overflows the context.
        raise ValidationFailed.of(field, f"must be between 1e-{MAX_EXPONENT} and 1e{MAX_EXPONENT}")
    return number


def decimal_places(number: Decimal) -> int:
    """Fractional digits that carry information: 1.50 has 1, 100 has 0."""
    exponent = number.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def parse_amount(
    value: str | Decimal | int,
    currency: str,
    field: str = "amount",
    *,
    currency_field: str | None = None,
    allow_negative: bool = False,
) -> Decimal:
    """An amount of money in a canonical `currency`, exact to its minor unit."""
    code = canonical_currency(currency, currency_field or _currency_field(field))
    number = parse_decimal(value, field)
    if number < 0 and not allow_negative:
        raise ValidationFailed.of(field, "must not be negative")
    if abs(number) >= MAX_AMOUNT:
        raise ValidationFailed.of(field, "is too large")
    digits = CURRENCIES[code]
    if decimal_places(number) > digits:
        raise ValidationFailed.of(field, f"{code} amounts have at most {digits} decimal places")
    return number.quantize(quantum(code))


def _currency_field(amount_field: str) -> str:
    return "currency" if amount_field == "amount" else f"{amount_field}.currency"


def round_money(number: Decimal, currency: str) -> Decimal:
    """Rounds a computed amount half-even to the currency's minor unit."""
    return number.quantize(quantum(currency), rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True)
class Money:
    """An exact amount in a canonical currency."""

    amount: Decimal
    currency: str

    @classmethod
    def of(cls, amount: str | Decimal | int, currency: str, field: str = "amount") -> Money:
        code = canonical_currency(currency, _currency_field(field))
        return cls(parse_amount(amount, code, field), code)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}"
