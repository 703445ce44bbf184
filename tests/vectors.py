"""AES-256-GCM known-answer vectors, 96-bit IV, no AAD, 128-bit tag.

Source: NIST CAVP GCM test vectors (SP 800-38D), files gcmEncryptExtIV256.rsp and gcmDecrypt256.rsp as
shipped in the `cryptography_vectors` package (cryptography_vectors/ciphers/AES/GCM/); a handful copied.
"""

# (key, iv, plaintext, ciphertext, tag), hex
ENCRYPT = [
    (
        "b52c505a37d78eda5dd34f20c22540ea1b58963cf8e5bf8ffa85f9f2492505b4",
        "516c33929df5a3284ff463d7",
        "",
        "",
        "bdc1ac884d332457a1d2664f168c76f0",
    ),
    (
        "5fe0861cdc2690ce69b3658c7f26f8458eec1c9243c5ba0845305d897e96ca0f",
        "770ac1a5a3d476d5d96944a1",
        "",
        "",
        "196d691e1047093ca4b3d2ef4baba216",
    ),
    (
        "82c4f12eeec3b2d3d157b0f992d292b237478d2cecc1d5f161389b97f999057a",
        "7b40b20f5f397177990ef2d1",
        "982a296ee1cd7086afad976945",
        "ec8e05a0471d6b43a59ca5335f",
        "113ddeafc62373cac2f5951bb9165249",
    ),
    (
        "db4340af2f835a6c6d7ea0ca9d83ca81ba02c29b7410f221cb6071114e393240",
        "40e438357dd80a85cac3349e",
        "8ddb3397bd42853193cb0f80c9",
        "b694118c85c41abf69e229cb0f",
        "c07f1b8aafbd152f697eb67f2a85fe45",
    ),
    (
        "31bdadd96698c204aa9ce1448ea94ae1fb4a9a0b3c9d773b51bb1822666b8f22",
        "0d18e06c7c725ac9e362e1ce",
        "2db5168e932556f8089a0622981d017d",
        "fa4362189661d163fcd6a56d8bf0405a",
        "d636ac1bbedd5cc3ee727dc2ab4a9489",
    ),
    (
        "460fc864972261c2560e1eb88761ff1c992b982497bd2ac36c04071cbb8e5d99",
        "8a4a16b9e210eb68bcb6f58d",
        "99e4e926ffe927f691893fb79a96b067",
        "133fc15751621b5f325c7ff71ce08324",
        "ec4e87e0cf74a13618d0b68636ba9fa7",
    ),
    (
        "268ed1b5d7c9c7304f9cae5fc437b4cd3aebe2ec65f0d85c3918d3d3b5bba89b",
        "9ed9d8180564e0e945f5e5d4",
        "fe29a40d8ebf57262bdb87191d01843f4ca4b2de97d88273154a0b7d9e2fdb80",
        "791a4a026f16f3a5ea06274bf02baab469860abde5e645f3dd473a5acddeecfc",
        "05b2b74db0662550435ef1900e136b15",
    ),
    (
        "c772a8d5e9f3384f16be2c34bf9afd9ebf86b69e6f610cd195a9db169e9be17e",
        "9b8e079f9971d7352e6810a3",
        "7f13fcaf0db79d792823a9271b1213a98d116eff7e8e3c86ddeb6a0a03f13afa",
        "d29e2bf3518668a14f17a3e4e76e1b43685734b801118d33a23238f34d18aa40",
        "8e02b0b7d172cf5e2578f5b30fac2e7a",
    ),
    (
        "1fded32d5999de4a76e0f8082108823aef60417e1896cf4218a2fa90f632ec8a",
        "1f3afa4711e9474f32e70462",
        "06b2c75853df9aeb17befd33cea81c630b0fc53667ff45199c629c8e15dce41e530aa792f796b8138eeab2e86c7b7bee1d40b0",
        "91fbd061ddc5a7fcc9513fcdfdc9c3a7c5d4d64cedf6a9c24ab8a77c36eefbf1c5dc00bc50121b96456c8cd8b6ff1f8b3e480f",
        "30096d340f3d5c42d82a6f475def23eb",
    ),
    (
        "b405ac89724f8b555bfee1eaa369cd854003e9fae415f28c5a199d4d6efc83d6",
        "cec71a13b14c4d9bd024ef29",
        "ab4fd35bef66addfd2856b3881ff2c74fdc09c82abe339f49736d69b2bd0a71a6b4fe8fc53f50f8b7d6d6d6138ab442c7f653f",
        "69a079bca9a6a26707bbfa7fd83d5d091edc88a7f7ff08bd8656d8f2c92144ff23400fcb5c370b596ad6711f386e18f2629e76",
        "6d2b7861a3c59ba5a3e3a11c92bb2b14",
    ),
]

# (key, iv, ciphertext, tag): gcmDecrypt256.rsp cases marked FAIL — must not authenticate.
MUST_FAIL = [
    (
        "c997768e2d14e3d38259667a6649079de77beb4543589771e5068e6cd7cd0b14",
        "835090aed9552dbdd45277e2",
        "9f6607d68e22ccf21928db0986be126e",
        "f32617f67c574fd9f44ef76ff880ab9f",
    ),
    (
        "f05871fa6fced6d88fb68b0f2cd8b3ff6298901c38799be6be33e7d6193a18e6",
        "1424ef6d15967c05509e50f2",
        "8492fe9e53510d96d9c2aa00e4967112",
        "33656dd6b89763313b4fd0105f506310",
    ),
    (
        "1759cac2024a3ddd5e561ca5a9b91c3c4e64c722381bd30f3f26851faf16c7e8",
        "656ca7bd2cb82ab7a3d6b268",
        "8d9530d3ac659240ddd8b77155cfc2f7",
        "6000924fb29f7d2588866371b131ef5d",
    ),
]
