#!/usr/bin/env node
'use strict';
// Prints the native sources listed in native/sources.txt (the one list, shared with CMakeLists.txt).
const fs = require('fs');
const path = require('path');

function sources() {
  return fs
    .readFileSync(path.join(__dirname, '..', 'native', 'sources.txt'), 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
}

module.exports = { sources };
if (require.main === module) process.stdout.write(sources().join(' ') + '\n');
