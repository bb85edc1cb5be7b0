#!/usr/bin/env node
'use strict';
require('../lib/cli/main.js').main(process.argv).then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    process.stderr.write(`customdiff: ${e && e.message ? e.message : e}\n`);
    process.exitCode = 1;
  },
);
