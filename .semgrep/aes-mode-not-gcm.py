"""semgrep --test fixture for tessera-aes-mode-not-gcm."""

import os

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

key = os.urandom(32)
iv = os.urandom(16)

# ruleid: tessera-aes-mode-not-gcm
ecb = Cipher(algorithms.AES(key), modes.ECB())
# ruleid: tessera-aes-mode-not-gcm
cbc = Cipher(algorithms.AES(key), modes.CBC(iv))
# ruleid: tessera-aes-mode-not-gcm
ctr = Cipher(algorithms.AES(key), modes.CTR(iv))
# ruleid: tessera-aes-mode-not-gcm
fernet = Fernet(Fernet.generate_key())

# ok: tessera-aes-mode-not-gcm
gcm = Cipher(algorithms.AES(key), modes.GCM(iv))
# ok: tessera-aes-mode-not-gcm
sealed = AESGCM(key).encrypt(iv[:12], b"card", None)
