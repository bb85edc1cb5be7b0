{
  "targets": [
    {
      "target_name": "custom_diffusion",
      "sources": ["<!@(node scripts/sources.js)"],
      "include_dirs": [
        "native",
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "<!@(node scripts/find-libtorch.js --include)"
      ],
      "defines": [
        "<!@(node scripts/find-libtorch.js --defines)",
        "NAPI_VERSION=8",
        "NODE_ADDON_API_CPP_EXCEPTIONS",
        "CD_LIBTORCH_IDENTITY=\"<!(node scripts/find-libtorch.js --identity)\""
      ],
      "cflags!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-std=gnu++17", "-std=c++17"],
      "cflags_cc": ["-std=c++20", "-fexceptions", "-Wno-unused-parameter", "-fvisibility=hidden"],
      "ldflags": ["<!@(node scripts/find-libtorch.js --ldflags)"]
    }
  ]
}
