"""Money: a Decimal amount in an ISO 4217 currency, never a float.

Rules (enforced by `parse_amount` and `Money`):

- amounts are decimals given as text or `Decimal`; floats are refused;
- an amount may not carry more fractional digits than its currency's minor
  unit (1.005 USD is refused rather than silently rounded) and is stored
  quantised to exactly that many digits (100 USD is kept as 100.00);
- computed amounts (line totals, weighted forecasts) are rounded half-even to
  the minor unit, once, at the end of the computation;
- NaN, infinities and amounts of 10**15 or more are refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from crm_common.errors import ValidationFailed

# Active ISO 4217 codes and their minor units (digits after the decimal point).
_MINOR_UNITS_TEXT = {
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

CURRENCIES: dict[str, int] = {
    code: digits for digits, codes in _MINOR_UNITS_TEXT.items() for code in codes.split()
}

MAX_AMOUNT = Decimal(10) ** 15


def minor_units(currency: str) -> int:
    return CURRENCIES[currency]


@functools.cache
def quantum(currency: str) -> Decimal:
    return Decimal(1).scaleb(-CURRENCIES[currency])


def check_currency(currency: str, field: str = "currency") -> str:
    if currency not in CURRENCIES:
        raise ValidationFailed.of(field, f"{currency!r} is not an ISO 4217 currency code")
    return currency


def parse_decimal(value: str | Decimal | int, field: str) -> Decimal:
    """A finite Decimal from text, a Decimal or an int (never a float)."""
    if isinstance(value, bool | float):
        raise ValidationFailed.of(field, "must be a decimal number given as text, not a float")
    if isinstance(value, Decimal):
        number = value
    else:
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            raise ValidationFailed.of(field, f"{value!r} is not a decimal number") from None
    if not number.is_finite():
        raise ValidationFailed.of(field, "must be a finite number")
    return number


def decimal_places(number: Decimal) -> int:
    exponent = number.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def parse_amount(value: str | Decimal | int, currency: str, field: str = "amount") -> Decimal:
    """An amount of money in `currency`: non-negative, exact to the minor unit."""
    check_currency(currency, f"{field}.currency" if field != "amount" else "currency")
    number = parse_decimal(value, field)
    if number < 0:
        raise ValidationFailed.of(field, "must not be negative")
    if number >= MAX_AMOUNT:
        raise ValidationFailed.of(field, "is too large")
    digits = CURRENCIES[currency]
    if decimal_places(number) > digits:
        raise ValidationFailed.of(field, f"{currency} amounts have at most {digits} decimal places")
    return number.quantize(quantum(currency))


def round_money(number: Decimal, currency: str) -> Decimal:
    """Rounds a computed amount half-even to the currency's minor unit."""
    return number.quantize(quantum(currency), rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True)
class Money:
    amount: Decimal
    currency: str

    @classmethod
    def of(cls, amount: str | Decimal | int, currency: str, field: str = "amount") -> Money:
        return cls(parse_amount(amount, currency, field), currency)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}"
