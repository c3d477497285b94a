# Vault policy for the key ceremonies' AppRole: create one transit key (ecdsa-p256, never
# exportable, never backed up in plaintext), rotate it and raise its min_encryption_version;
# read its public versions. Nothing else: no sign, verify, export, backup, delete, list, and
# no config but min_encryption_version (so never exportable=true, never deletion_allowed).
# deploy/vault/setup.py writes it with your mount and key name in place of "transit" and
# "modelsign-staging". Only the processes that complete ceremonies hold this credential (the
# web, for the custodian pages, and the key_ceremony runner); never the worker or beat.
#
# allowed_parameters: any parameter not listed is refused, and a listed one must have a listed
# value ([] means any value). Vault does not require a listed parameter to be present, so a
# create without "type" would make an aes256-gcm96 key of that name: it cannot sign, and the
# service refuses it. min_encryption_version can be set to any value, lower too: Vault cannot
# express "only upwards"; the service pins a version per key and never signs with "latest".

path "transit/keys/modelsign-staging" {
  capabilities = ["create", "read", "update"]
  allowed_parameters = {
    "type" = ["ecdsa-p256"]
    "exportable" = [false]
    "allow_plaintext_backup" = [false]
  }
}

path "transit/keys/modelsign-staging/rotate" {
  capabilities = ["update"]
}

path "transit/keys/modelsign-staging/config" {
  capabilities = ["update"]
  allowed_parameters = {
    "min_encryption_version" = []
  }
}
