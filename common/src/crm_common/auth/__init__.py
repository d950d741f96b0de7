"""Identity and access: tokens, keys, the access policy and the gate every request passes."""
