// A real OIDC issuer for rna's integration tests (tests/oidc.rs): oidc-provider with client
// credentials and resource indicators giving JWT access tokens (ES256, RS256, PS256 and
// EdDSA keys; the client id picks the algorithm), served over https on
// 127.0.0.1 with a certificate the test made.
//
//   node issuer.mjs CERT.pem KEY.pem
//
// Environment: TOKEN_TTL (seconds, default 60). Prints `port=N` on stdout once listening.
// GET /test/rotate makes a new ES256 key the signing key (the old one stays published) and
// answers {"kid": "..."}. Stop it by killing the process.

import { createServer } from 'node:https';
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const [certFile, keyFile] = process.argv.slice(2);
if (!certFile || !keyFile) {
  console.error('usage: node issuer.mjs CERT.pem KEY.pem');
  process.exit(2);
}
const ttl = Number(process.env.TOKEN_TTL || 60);
const audience = 'https://hub.rna.test';
const scopes = ['connect:agentHub', 'read:infra:data', 'proxy', 'exec:infra:op'];
// The tenant each client's tokens carry, in the custom `rna_tenant` claim.
const tenants = {
  edge: 'acme/prod',
  'edge-rs': 'acme/prod',
  'edge-ps': 'acme/prod',
  'edge-ed': 'acme/prod',
  'edge-post': 'acme/prod',
  globex: 'globex/prod',
};
// The signing algorithm of each client's tokens (ES256 for the others).
const algs = { 'edge-rs': 'RS256', 'edge-ps': 'PS256', 'edge-ed': 'EdDSA' };

function privateJwk(type, alg) {
  const options = { ec: { namedCurve: 'P-256' }, rsa: { modulusLength: 2048 }, ed25519: {} }[type];
  const { privateKey } = generateKeyPairSync(type, options);
  return { ...privateKey.export({ format: 'jwk' }), kid: `${alg}-${randomUUID()}`, alg, use: 'sig' };
}

let keys = [
  privateJwk('ec', 'ES256'),
  privateJwk('rsa', 'RS256'),
  privateJwk('rsa', 'PS256'),
  privateJwk('ed25519', 'EdDSA'),
];

function client(id, method = 'client_secret_basic') {
  return {
    client_id: id,
    client_secret: `${id}-secret`,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: method,
    scope: scopes.join(' '),
  };
}

function provider(issuer) {
  const p = new Provider(issuer, {
    clients: [
      ...['edge', 'edge-rs', 'edge-ps', 'edge-ed', 'globex'].map((id) => client(id)),
      client('edge-post', 'client_secret_post'),
    ],
    jwks: { keys },
    scopes,
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => audience,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource, c) => ({
          scope: scopes.join(' '),
          audience: resource,
          accessTokenTTL: ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: algs[c.clientId] || 'ES256' } },
        }),
      },
    },
    extraTokenClaims: (ctx, token) => ({ rna_tenant: tenants[token.clientId] }),
  });
  p.on('server_error', (ctx, err) => console.error('server_error', err));
  return p;
}

let current;
const server = createServer(
  { cert: readFileSync(certFile), key: readFileSync(keyFile) },
  (req, res) => {
    if (req.url === '/test/rotate') {
      const fresh = privateJwk('ec', 'ES256');
      keys = [fresh, ...keys];
      // oidc-provider reads its keys at construction: a new instance with the same issuer
      // serves the new key set (tokens are self-contained JWTs, so no state is lost).
      current = provider(current.issuer).callback();
      current.issuer = server.issuer;
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ kid: fresh.kid }));
      return;
    }
    current(req, res);
  },
);
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  server.issuer = `https://127.0.0.1:${port}`;
  current = provider(server.issuer).callback();
  current.issuer = server.issuer;
  console.log(`port=${port}`);
});
