"""AES-256-GCM known-answer vectors (96-bit IV, no AAD, 128-bit tag) for the GPU path's tests.

Copied verbatim from NIST CAVP "GCM Test Vectors" (CAVS 14.0), files gcmEncryptExtIV256.rsp and
gcmDecrypt256.rsp, as shipped in the `cryptography_vectors` package
(cryptography_vectors/ciphers/AES/GCM/). Entries are taken from the [Keylen = 256] [IVlen = 96]
[AADlen = 0] [Taglen = 128] sections; the name gives the file, PTlen (bits) and Count. In the
decrypt file a FAIL entry has no PT: it must not authenticate (`valid` is False).
"""

from __future__ import annotations

from typing import NamedTuple


class GcmVector(NamedTuple):
    """One known-answer vector; hex strings."""

    name: str
    key: str
    iv: str
    pt: str
    ct: str
    tag: str
    valid: bool


ENCRYPT_VECTORS: list[GcmVector] = [
    GcmVector(
        "gcmEncryptExtIV256.rsp PTlen=0 Count=0",
        "b52c505a37d78eda5dd34f20c22540ea1b58963cf8e5bf8ffa85f9f2492505b4",
        "516c33929df5a3284ff463d7",
        "",
        "",
        "bdc1ac884d332457a1d2664f168c76f0",
        True,
    ),
    GcmVector(
        "gcmEncryptExtIV256.rsp PTlen=0 Count=1",
        "5fe0861cdc2690ce69b3658c7f26f8458eec1c9243c5ba0845305d897e96ca0f",
        "770ac1a5a3d476d5d96944a1",
        "",
        "",
        "196d691e1047093ca4b3d2ef4baba216",
        True,
    ),
    GcmVector(
        "gcmEncryptExtIV256.rsp PTlen=104 Count=0",
        "82c4f12eeec3b2d3d157b0f992d292b237478d2cecc1d5f161389b97f999057a",
        "7b40b20f5f397177990ef2d1",
        "982a296ee1cd7086afad976945",
        "ec8e05a0471d6b43a59ca5335f",
        "113ddeafc62373cac2f5951bb9165249",
        True,
    ),
    GcmVector(
        "gcmEncryptExtIV256.rsp PTlen=104 Count=1",
        "db4340af2f835a6c6d7ea0ca9d83ca81ba02c29b7410f221cb6071114e393240",
        "40e438357dd80a85cac3349e",
        "8ddb3397bd42853193cb0f80c9",
        "b694118c85c41abf69e229cb0f",
        "c07f1b8aafbd152f697eb67f2a85fe45",
        True,
    ),
    GcmVector(
        "gcmEncryptExtIV256.rsp PTlen=128 Count=0",
        "31bdadd96698c204aa9ce1448ea94ae1fb4a9a0b3c9d773b51bb1822666b8f22",
        "0d18e06c7c725ac9e362e1ce",
        "2db5168e932556f8089a0622981d017d",
        "fa4362189661d163fcd6a56d8bf0405a",
        "d636ac1bbedd5cc3ee727dc2ab4a9489",
        True,
    ),
    GcmVector(
        "gcmEncryptExtIV256.rsp PTlen=256 Count=0",
        "268ed1b5d7c9c7304f9cae5fc437b4cd3aebe2ec65f0d85c3918d3d3b5bba89b",
        "9ed9d8180564e0e945f5e5d4",
        "fe29a40d8ebf57262bdb87191d01843f4ca4b2de97d88273154a0b7d9e2fdb80",
        "791a4a026f16f3a5ea06274bf02baab469860abde5e645f3dd473a5acddeecfc",
        "05b2b74db0662550435ef1900e136b15",
        True,
    ),
    GcmVector(
        "gcmEncryptExtIV256.rsp PTlen=408 Count=0",
        "1fded32d5999de4a76e0f8082108823aef60417e1896cf4218a2fa90f632ec8a",
        "1f3afa4711e9474f32e70462",
        "06b2c75853df9aeb17befd33cea81c630b0fc53667ff45199c629c8e15dce41e530aa792f796b8138eeab2e86c7b7bee1d40b0",
        "91fbd061ddc5a7fcc9513fcdfdc9c3a7c5d4d64cedf6a9c24ab8a77c36eefbf1c5dc00bc50121b96456c8cd8b6ff1f8b3e480f",
        "30096d340f3d5c42d82a6f475def23eb",
        True,
    ),
    GcmVector(
        "gcmEncryptExtIV256.rsp PTlen=408 Count=1",
        "b405ac89724f8b555bfee1eaa369cd854003e9fae415f28c5a199d4d6efc83d6",
        "cec71a13b14c4d9bd024ef29",
        "ab4fd35bef66addfd2856b3881ff2c74fdc09c82abe339f49736d69b2bd0a71a6b4fe8fc53f50f8b7d6d6d6138ab442c7f653f",
        "69a079bca9a6a26707bbfa7fd83d5d091edc88a7f7ff08bd8656d8f2c92144ff23400fcb5c370b596ad6711f386e18f2629e76",
        "6d2b7861a3c59ba5a3e3a11c92bb2b14",
        True,
    ),
]
DECRYPT_VECTORS: list[GcmVector] = [
    GcmVector(
        "gcmDecrypt256.rsp PTlen=0 Count=0",
        "f5a2b27c74355872eb3ef6c5feafaa740e6ae990d9d48c3bd9bb8235e589f010",
        "58d2240f580a31c1d24948e9",
        "",
        "",
        "15e051a5e4a5f5da6cea92e2ebee5bac",
        True,
    ),
    GcmVector(
        "gcmDecrypt256.rsp PTlen=0 Count=1",
        "e5a8123f2e2e007d4e379ba114a2fb66e6613f57c72d4e4f024964053028a831",
        "51e43385bf533e168427e1ad",
        "",
        "",
        "38fe845c66e66bdd884c2aecafd280e6",
        False,
    ),
    GcmVector(
        "gcmDecrypt256.rsp PTlen=104 Count=0",
        "8b37c4b8cf634704920059866ad96c49e9da502c63fca4a3a7a4dcec74cb0610",
        "cb59344d2b06c4ae57cd0ea4",
        "",
        "66ab935c93555e786b775637a3",
        "d8733acbb564d8afaa99d7ca2e2f92a9",
        False,
    ),
    GcmVector(
        "gcmDecrypt256.rsp PTlen=104 Count=1",
        "a71dac1377a3bf5d7fb1b5e36bee70d2e01de2a84a1c1009ba7448f7f26131dc",
        "c5b60dda3f333b1146e9da7c",
        "5b87141335f2becac1a559e05f",
        "43af49ec1ae3738a20755034d6",
        "6f80b6ef2d8830a55eb63680a8dff9e0",
        True,
    ),
    GcmVector(
        "gcmDecrypt256.rsp PTlen=128 Count=0",
        "4c8ebfe1444ec1b2d503c6986659af2c94fafe945f72c1e8486a5acfedb8a0f8",
        "473360e0ad24889959858995",
        "7789b41cb3ee548814ca0b388c10b343",
        "d2c78110ac7e8f107c0df0570bd7c90c",
        "c26a379b6d98ef2852ead8ce83a833a7",
        True,
    ),
    GcmVector(
        "gcmDecrypt256.rsp PTlen=128 Count=2",
        "c997768e2d14e3d38259667a6649079de77beb4543589771e5068e6cd7cd0b14",
        "835090aed9552dbdd45277e2",
        "",
        "9f6607d68e22ccf21928db0986be126e",
        "f32617f67c574fd9f44ef76ff880ab9f",
        False,
    ),
    GcmVector(
        "gcmDecrypt256.rsp PTlen=256 Count=0",
        "c3d99825f2181f4808acd2068eac7441a65bd428f14d2aab43fefc0129091139",
        "cafabd9672ca6c79a2fbdc22",
        "25431587e9ecffc7c37f8d6d52a9bc3310651d46fb0e3bad2726c8f2db653749",
        "84e5f23f95648fa247cb28eef53abec947dbf05ac953734618111583840bd980",
        "79651c875f7941793d42bbd0af1cce7c",
        True,
    ),
    GcmVector(
        "gcmDecrypt256.rsp PTlen=256 Count=3",
        "a6da42afcc5b86f989910f7d27f29362a4e4a07ab9b7090d5820cbf97faf0729",
        "fa099d57bdcec5b25ee2e20d",
        "",
        "c70900c56aaedf2af746e834d39af7eed53b86b1e832d9f72bcf35ecf8144282",
        "44d3f379ca0c4afa71b147bc84d49143",
        False,
    ),
    GcmVector(
        "gcmDecrypt256.rsp PTlen=408 Count=0",
        "4433db5fe066960bdd4e1d4d418b641c14bfcef9d574e29dcd0995352850f1eb",
        "0e396446655582838f27f72f",
        "d602c06b947abe06cf6aa2c5c1562e29062ad6220da9bc9c25d66a60bd85a80d4fbcc1fb4919b6566be35af9819aba836b8b47",
        "b0d254abe43bdb563ead669192c1e57e9a85c51dba0f1c8501d1ce92273f1ce7e140dcfac94757fabb128caad16912cead0607",
        "ffd0b02c92dbfcfbe9d58f7ff9e6f506",
        True,
    ),
    GcmVector(
        "gcmDecrypt256.rsp PTlen=408 Count=1",
        "28ae911ee685872d906de12d7696351df8ef2234a74a95efa4ea15b327338fe0",
        "2fe6a815d4865181fade5fac",
        "",
        "1168442ef64656ef6577fb42c1919c84aae856388e4db9945bb8c9b8412bbe6458bc400444d5d2bf2630f83468f66f9e46e790",
        "b75f616fd1a3d6563b62b899e5a7e522",
        False,
    ),
]
