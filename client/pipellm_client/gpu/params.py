"""The one place for every constant the CUDA kernels and the numpy reference must agree on.

The kernel source (``aesgcm.cu``) has no numbers of its own: it receives these values as ``-D``
defines from :meth:`GcmParams.cuda_defines`, and the numpy reference reads the same object. Tests
build both sides with small non-default parameters too, so the multi-level GHASH reduction is
exercised on small inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

# Value the tag check writes into the device flag when the tag matched. Any other value (the kernels
# write 0) means "not authenticated"; a magic number rather than 1 so a stale or garbage flag word is
# very unlikely to read as success.
FLAG_OK = 0x5AFE600D
FLAG_BAD = 0

# ``mode`` argument of the GHASH reduction kernel: what the final level does with the computed tag.
MODE_DECRYPT = 1  # compare against the tag that follows the ciphertext, write the flag
MODE_ENCRYPT = 2  # write the tag after the ciphertext

# Kernel entry points in aesgcm.cu.
KERNEL_GHASH_CT = "plm_gcm_ghash_ct"
KERNEL_GHASH_REDUCE = "plm_gcm_ghash_reduce"
KERNEL_CTR_DECRYPT = "plm_gcm_ctr_decrypt"
KERNEL_ENCRYPT = "plm_gcm_encrypt"
KERNEL_NAMES = (KERNEL_GHASH_CT, KERNEL_GHASH_REDUCE, KERNEL_CTR_DECRYPT, KERNEL_ENCRYPT)

AES_BLOCK = 16
TAG_BYTES = 16
NONCE_BYTES = 12
KEY_BYTES = 32
AES256_ROUNDS = 14
RK_WORDS = 4 * (AES256_ROUNDS + 1)  # 60 round-key words

# Largest GCM message (NIST SP 800-38D: 2^39 - 256 bits) = 2^32 - 2 counter blocks.
GCM_MAX_BYTES = (1 << 36) - 32

# Key-context layout (uint32 words), shared by all kernels; see build_context in keyctx.py.
CTX_T0 = 0  # 256 words: AES T-table T0 (T1..T3 are byte rotations of it)
CTX_R = 256  # 16 words: GHASH 4-bit reduction table, pre-shifted into the top word
CTX_RK = 272  # 60 words (+4 pad): AES-256 round keys, big-endian column words
CTX_SHOUP = 336  # per level: 16 entries x 4 words, Shoup table of that level's multiplier
SHOUP_WORDS = 64
PW_ENTRY_WORDS = 16  # (P, P*x^32, P*x^64, P*x^96), 4 words each

# Batch table layout (uint32 words; built by plan.Plan.table, read by every kernel; see aesgcm.cu):
# flags[n] at word 0, padded to a multiple of 4 words; then one descriptor of msg_words per message;
# then (max_levels + 1) arrays of n + 1 block starts (the GHASH levels, then the CTR pass).
MSG_SRC = 0  # u64 (two words, low first): decrypt: ciphertext || tag; encrypt: plaintext
MSG_DST = 2  # u64: decrypt: plaintext (0: verify only); encrypt: ciphertext || tag
MSG_NBYTES = 4  # u64: message length without the tag
MSG_NONCE = 6  # 3 words: the nonce as big-endian words (the first three words of every counter block)
MSG_LEVELS = 10  # per GHASH level L: word 2L = front padding (items), 2L + 1 = uint4 index of its partials
MAX_BATCH = 4096  # messages one batch may hold (host-side limit; the kernels take any n >= 1)


@dataclass(frozen=True)
class GcmParams:
    """Work decomposition of the GPU AES-GCM kernels.

    threads_per_block: CUDA block size of every kernel (a multiple of 32).
    ctr_blocks_per_thread: consecutive 16-byte blocks one thread decrypts in the CTR pass.
    ghash_run0: consecutive ciphertext blocks one thread folds (Horner) in GHASH level 0; also the
        blocks one thread encrypts in the fused encrypt kernel.
    ghash_run: partials one thread folds in GHASH levels >= 1.
    enc_group: blocks the fused encrypt kernel runs through AES at once (ILP); divides ghash_run0.
    max_levels: GHASH reduction levels the key context holds tables for; bounds the message size.
    """

    threads_per_block: int = 256
    ctr_blocks_per_thread: int = 4
    ghash_run0: int = 8
    ghash_run: int = 4
    enc_group: int = 4
    max_levels: int = 3

    def __post_init__(self) -> None:
        tpb = self.threads_per_block
        if tpb % 32 != 0 or not 32 <= tpb <= 1024:
            raise ValueError(f"threads_per_block must be a multiple of 32 in [32, 1024], got {tpb}")
        for name in ("ctr_blocks_per_thread", "ghash_run0", "ghash_run", "enc_group", "max_levels"):
            value = getattr(self, name)
            if not 1 <= value <= 64:
                raise ValueError(f"{name} must be in [1, 64], got {value}")
        if self.ghash_run0 % self.enc_group != 0:
            raise ValueError(f"enc_group ({self.enc_group}) must divide ghash_run0 ({self.ghash_run0})")

    def run_length(self, level: int) -> int:
        """Items one thread folds at a GHASH level."""
        return self.ghash_run0 if level == 0 else self.ghash_run

    def span(self, level: int) -> int:
        """Items one CUDA block folds at a GHASH level."""
        return self.run_length(level) * self.threads_per_block

    @property
    def pw_level_words(self) -> int:
        """Words of one level's table of combine multipliers (one entry per thread)."""
        return self.threads_per_block * PW_ENTRY_WORDS

    @property
    def ctx_pw(self) -> int:
        """Word offset of level 0's combine multipliers in the key context."""
        return CTX_SHOUP + SHOUP_WORDS * self.max_levels

    @property
    def ctx_words(self) -> int:
        """Size of the key context in uint32 words."""
        return self.ctx_pw + self.pw_level_words * self.max_levels

    @property
    def max_blocks(self) -> int:
        """Most 16-byte blocks a message may have: the plan's capacity, capped by GCM's limit."""
        capacity = self.span(0)
        for level in range(1, self.max_levels):
            capacity *= self.span(level)
        return min(capacity, (1 << 32) - 2)

    @property
    def max_message_bytes(self) -> int:
        """Largest plaintext/ciphertext length accepted, in bytes."""
        return min(self.max_blocks * AES_BLOCK, GCM_MAX_BYTES)

    @property
    def msg_words(self) -> int:
        """Words of one message descriptor in the batch table (a multiple of 4: 16-byte aligned)."""
        return -(-(MSG_LEVELS + 2 * self.max_levels) // 4) * 4

    def tab_msgs(self, n: int) -> int:
        """Word offset of the first message descriptor in the table of an n-message batch."""
        return -(-n // 4) * 4

    def tab_starts(self, n: int) -> int:
        """Word offset of the block-start arrays in the table of an n-message batch."""
        return self.tab_msgs(n) + n * self.msg_words

    def tab_words(self, n: int) -> int:
        """Size of the table of an n-message batch, in words."""
        return self.tab_starts(n) + (self.max_levels + 1) * (n + 1)

    def cuda_defines(self) -> tuple[str, ...]:
        """The -D options that give aesgcm.cu these parameters (NVRTC and nvcc alike)."""
        values = {
            "PLM_TPB": self.threads_per_block,
            "PLM_CTR_BPT": self.ctr_blocks_per_thread,
            "PLM_GH_RUN0": self.ghash_run0,
            "PLM_GH_RUN": self.ghash_run,
            "PLM_ENC_GROUP": self.enc_group,
            "PLM_MAX_LEVELS": self.max_levels,
            "PLM_FLAG_OK": f"0x{FLAG_OK:08X}u",
            "PLM_FLAG_BAD": f"{FLAG_BAD}u",
            "PLM_MODE_DECRYPT": MODE_DECRYPT,
            "PLM_MODE_ENCRYPT": MODE_ENCRYPT,
            "PLM_CTX_T0": CTX_T0,
            "PLM_CTX_R": CTX_R,
            "PLM_CTX_RK": CTX_RK,
            "PLM_CTX_SHOUP": CTX_SHOUP,
            "PLM_SHOUP_WORDS": SHOUP_WORDS,
            "PLM_CTX_PW": self.ctx_pw,
            "PLM_PW_LEVEL_WORDS": self.pw_level_words,
            "PLM_PW_ENTRY_WORDS": PW_ENTRY_WORDS,
            "PLM_GHASH_MIN_BLOCKS": max(1, 1024 // self.threads_per_block),
            "PLM_MSG_WORDS": self.msg_words,
            "PLM_MSG_SRC": MSG_SRC,
            "PLM_MSG_DST": MSG_DST,
            "PLM_MSG_NBYTES": MSG_NBYTES,
            "PLM_MSG_NONCE": MSG_NONCE,
            "PLM_MSG_LEVELS": MSG_LEVELS,
        }
        return tuple(f"-D{name}={value}" for name, value in values.items())


DEFAULT_PARAMS = GcmParams()
